package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Namespace creates a namespace for one test (namespaces are never deleted: no namespace
// controller runs, and the control plane's state is thrown away after the run).
func Namespace(t testing.TB, name string) string {
	t.Helper()
	return NamespaceOn(t, Kube, name)
}

// NamespaceOn is Namespace on another control plane (a test's own).
func NamespaceOn(t testing.TB, kube *cluster.Cluster, name string) string {
	t.Helper()
	_, err := kube.Client.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	return name
}

var unsafeName = regexp.MustCompile(`[^a-z0-9-]+`)

// NSName turns a test name (and an optional suffix) into a namespace name: unique per test, as
// test names are.
func NSName(t testing.TB, suffix string) string {
	n := strings.Trim(unsafeName.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	if suffix != "" {
		n += "-" + suffix
	}
	if len(n) > 63 {
		n = strings.Trim(n[len(n)-63:], "-")
	}
	return n
}

// ReadExample decodes a file of deploy/examples (or any repository path).
func ReadExample(t testing.TB, rel string) []*unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(RepoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := cluster.DecodeYAML(b)
	if err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	return objs
}

// Find returns the first object of a kind.
func Find(t testing.TB, objs []*unstructured.Unstructured, kind string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind {
			return o
		}
	}
	t.Fatalf("no %s in the example", kind)
	return nil
}

// Set sets a nested field of an object.
func Set(t testing.TB, o *unstructured.Unstructured, value any, path ...string) {
	t.Helper()
	if err := unstructured.SetNestedField(o.Object, value, path...); err != nil {
		t.Fatalf("set %v on %s %s: %v", path, o.GetKind(), o.GetName(), err)
	}
}

// SetTrigger changes one metadata key of every trigger of a ScaledObject or ScaledJob.
func SetTrigger(t testing.TB, o *unstructured.Unstructured, key, value string) {
	t.Helper()
	triggers, _, _ := unstructured.NestedSlice(o.Object, "spec", "triggers")
	if len(triggers) == 0 {
		t.Fatalf("%s %s has no triggers", o.GetKind(), o.GetName())
	}
	for _, tr := range triggers {
		md, _ := tr.(map[string]any)["metadata"].(map[string]any)
		md[key] = value
	}
	Set(t, o, triggers, "spec", "triggers")
}

// SetImage points every container at an image that is never pulled (no kubelet runs).
func SetImage(t testing.TB, o *unstructured.Unstructured) {
	t.Helper()
	path := []string{"spec", "template", "spec", "containers"}
	if o.GetKind() == "ScaledJob" {
		path = []string{"spec", "jobTargetRef", "template", "spec", "containers"}
	}
	containers, _, _ := unstructured.NestedSlice(o.Object, path...)
	for _, c := range containers {
		c.(map[string]any)["image"] = "cks-e2e.invalid/celery-worker:never-pulled"
	}
	Set(t, o, containers, path...)
}

// CopyDeployment copies a Deployment under another name, with its own pod labels: an HPA refuses
// to act on pods another HPA also selects.
func CopyDeployment(t testing.TB, deployment *unstructured.Unstructured, name string) *unstructured.Unstructured {
	t.Helper()
	dep := deployment.DeepCopy()
	dep.SetName(name)
	labels := map[string]any{"app.kubernetes.io/name": name}
	dep.SetLabels(map[string]string{"app.kubernetes.io/name": name})
	Set(t, dep, labels, "spec", "selector", "matchLabels")
	Set(t, dep, labels, "spec", "template", "metadata", "labels")
	return dep
}

// NewScaledObject is a ScaledObject with one trigger, scaling target from 0 to 20 replicas.
func NewScaledObject(name, target, kind string, polling, cooldown int64, md map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
		"metadata": map[string]any{"name": name},
		"spec": map[string]any{
			"scaleTargetRef":  map[string]any{"name": target},
			"minReplicaCount": int64(0), "maxReplicaCount": int64(20),
			"pollingInterval": polling, "cooldownPeriod": cooldown,
			"triggers": []any{map[string]any{"type": kind, "metadata": md}},
		},
	}}
}

// NestedInt reads an integer field (int64 or float64 in decoded YAML).
func NestedInt(obj map[string]any, path ...string) (int64, bool, error) {
	var cur any = obj
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return 0, false, fmt.Errorf("no %v", path)
		}
		cur = m[p]
	}
	switch v := cur.(type) {
	case int64:
		return v, true, nil
	case float64:
		return int64(v), true, nil
	}
	return 0, false, fmt.Errorf("%v is %T", path, cur)
}

// StringMap reads a map field as strings.
func StringMap(obj map[string]any, field string) (map[string]string, bool, error) {
	raw, ok := obj[field].(map[string]any)
	if !ok {
		return nil, false, fmt.Errorf("no %s", field)
	}
	out := map[string]string{}
	for k, v := range raw {
		out[k] = fmt.Sprint(v)
	}
	return out, true, nil
}

// Apply server-side applies objects into ns. ScaledObjects and ScaledJobs are deleted when the
// test ends, so that no later test shares the broker with their polls and streams.
func Apply(t testing.TB, ns string, objs ...*unstructured.Unstructured) {
	t.Helper()
	for _, o := range objs {
		applied, err := Kube.Apply(context.Background(), ns, o)
		if err != nil {
			t.Fatalf("apply %s %s in %s: %v", o.GetKind(), o.GetName(), ns, err)
		}
		gvr := map[string]schema.GroupVersionResource{"ScaledObject": ScaledObjectGVR, "ScaledJob": ScaledJobGVR}[o.GetKind()]
		if o.GetAPIVersion() == "keda.sh/v1alpha1" && gvr.Resource != "" {
			name, namespace := applied.GetName(), applied.GetNamespace()
			t.Cleanup(func() {
				_ = Kube.Dynamic.Resource(gvr).Namespace(namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
			})
		}
	}
}

// ApplyOn server-side applies objects into ns of another control plane (a test's own).
func ApplyOn(t testing.TB, kube *cluster.Cluster, ns string, objs ...*unstructured.Unstructured) {
	t.Helper()
	for _, o := range objs {
		if _, err := kube.Apply(context.Background(), ns, o); err != nil {
			t.Fatalf("apply %s %s in %s: %v", o.GetKind(), o.GetName(), ns, err)
		}
	}
}

// ContainerEnv returns the NAME=value entries with a literal value of the environment of a
// Deployment's first container: how a test runs a process as the manifest would.
func ContainerEnv(t testing.TB, dep *unstructured.Unstructured) []string {
	t.Helper()
	containers, _, _ := unstructured.NestedSlice(dep.Object, "spec", "template", "spec", "containers")
	if len(containers) == 0 {
		t.Fatalf("Deployment %s has no containers", dep.GetName())
	}
	var env []string
	entries, _ := containers[0].(map[string]any)["env"].([]any)
	for _, e := range entries {
		m, _ := e.(map[string]any)
		if v, ok := m["value"].(string); ok {
			env = append(env, fmt.Sprintf("%s=%s", m["name"], v))
		}
	}
	return env
}

// ReadFile returns a file's content or fails the test.
func ReadFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
