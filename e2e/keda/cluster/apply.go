package cluster

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/restmapper"
)

// FieldManager is the server-side apply field manager of everything the tests apply.
const FieldManager = "cks-e2e"

// DecodeYAML splits a multi-document YAML stream into objects (empty documents are skipped).
func DecodeYAML(b []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var out []*unstructured.Unstructured
	for {
		var obj map[string]any
		if err := dec.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, err
		}
		if len(obj) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: obj})
	}
}

// ApplyYAML server-side applies every document of a YAML stream, as `kubectl apply --server-side`
// does; namespaced objects without a namespace go into ns. It returns the applied objects.
func (c *Cluster) ApplyYAML(ctx context.Context, ns string, b []byte) ([]*unstructured.Unstructured, error) {
	objs, err := DecodeYAML(b)
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, o := range objs {
		applied, err := c.Apply(ctx, ns, o)
		if err != nil {
			return out, err
		}
		out = append(out, applied)
	}
	return out, nil
}

// Apply server-side applies one object (forcing conflicts, like a re-apply of a changed file).
func (c *Cluster) Apply(ctx context.Context, ns string, o *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	return c.apply(ctx, ns, o, false)
}

// DryRun server-side applies one object with dryRun=All: the API server validates, defaults and
// admits it completely, and stores nothing, so no controller acts on it.
func (c *Cluster) DryRun(ctx context.Context, ns string, o *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	return c.apply(ctx, ns, o, true)
}

func (c *Cluster) apply(ctx context.Context, ns string, o *unstructured.Unstructured, dryRun bool) (*unstructured.Unstructured, error) {
	gvk := o.GroupVersionKind()
	mapping, err := c.mapper().RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		// A CRD applied a moment ago is not in the cached discovery yet: discover again.
		c.mapper().Reset()
		if mapping, err = c.mapper().RESTMapping(gvk.GroupKind(), gvk.Version); err != nil {
			return nil, fmt.Errorf("%s %s: %w", gvk, o.GetName(), err)
		}
	}
	body, err := o.MarshalJSON()
	if err != nil {
		return nil, err
	}
	force := true
	// Strict: an unknown or duplicated field is an error, as with `kubectl apply --server-side`.
	opts := metav1.PatchOptions{FieldManager: FieldManager, Force: &force, FieldValidation: "Strict"}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		n := o.GetNamespace()
		if n == "" {
			n = ns
		}
		if n == "" {
			n = "default"
		}
		return c.Dynamic.Resource(mapping.Resource).Namespace(n).Patch(ctx, o.GetName(), types.ApplyPatchType, body, opts)
	}
	return c.Dynamic.Resource(mapping.Resource).Patch(ctx, o.GetName(), types.ApplyPatchType, body, opts)
}

// mapper is the cluster's REST mapper over a cached discovery; it is safe for concurrent use (the
// deferred mapper and the memory cache lock themselves), and created once.
func (c *Cluster) mapper() meta.ResettableRESTMapper {
	c.mapperMu.Lock()
	defer c.mapperMu.Unlock()
	if c.restMapper == nil {
		c.restMapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(c.Client.Discovery()))
	}
	return c.restMapper
}

func crdName(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	objs, err := DecodeYAML(b)
	if err != nil {
		return "", err
	}
	if len(objs) != 1 || objs[0].GetName() == "" {
		return "", fmt.Errorf("%s: expected one named CRD", path)
	}
	return objs[0].GetName(), nil
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
