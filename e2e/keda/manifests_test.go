package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestManifestsApply: every kustomization of deploy/ (base, overlays, components through the test
// kustomizations, the IRSA example) and every example file go into the real API server by
// server-side apply with strict field validation, with KEDA's, cert-manager's and the Prometheus
// Operator's CRDs installed from their Go modules; the sidecar component is applied to KEDA's own
// operator Deployment (config/manager/manager.yaml of the pinned KEDA module); every negative
// fixture of tests/k8s/invalid is refused.
func TestManifestsApply(t *testing.T) {
	t.Parallel()
	// deploy/overlays/tls/cert-manager's ClusterTriggerAuthentication, and objects in KEDA's
	// namespace, are TestTLSAndMutualTLS's too.
	harness.Exclusive(t, harness.KedaObjects)
	certManager := harness.ModuleDir(t, "../crds", "github.com/cert-manager/cert-manager")
	promOperator := harness.ModuleDir(t, "../crds", "github.com/prometheus-operator/prometheus-operator")
	crds, _ := filepath.Glob(filepath.Join(certManager, "deploy", "crds", "cert-manager.io_*.yaml"))
	crds = append(crds, filepath.Join(promOperator, "example", "prometheus-operator-crd", "monitoring.coreos.com_servicemonitors.yaml"))
	harness.InstallCRDs(t, crds...)

	total := 0
	// Kustomizations (Components are rendered through tests/k8s/components).
	var dirs []string
	for _, root := range []string{"deploy", "tests/k8s/components"} {
		_ = filepath.WalkDir(filepath.Join(harness.RepoRoot, root), func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "kustomization.yaml" {
				return err
			}
			b, _ := os.ReadFile(p)
			if bytes.Contains(b, []byte("kind: Component")) {
				return nil
			}
			dirs = append(dirs, filepath.Dir(p))
			return nil
		})
	}
	for _, dir := range dirs {
		rel, _ := filepath.Rel(harness.RepoRoot, dir)
		ns := harness.Namespace(t, "manifests-"+strings.ReplaceAll(strings.ReplaceAll(rel, "/", "-"), "_", "-"))
		total += harness.ApplyAll(t, "kubectl kustomize "+rel, ns, harness.Kustomize(t, dir))
	}
	// Example files (kustomization.yaml files are rendered above).
	examples, _ := filepath.Glob(filepath.Join(harness.RepoRoot, "deploy", "examples", "*", "*.yaml"))
	for _, f := range examples {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		rel, _ := filepath.Rel(harness.RepoRoot, f)
		ns := harness.Namespace(t, "manifests-"+strings.TrimSuffix(strings.ReplaceAll(strings.TrimPrefix(rel, "deploy/examples/"), "/", "-"), ".yaml"))
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := cluster.DecodeYAML(b)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		total += harness.ApplyAll(t, rel, ns, objs)
	}

	// The sidecar component on KEDA's real operator Deployment.
	total += applySidecar(t)
	t.Logf("the API server accepted %d objects from %d kustomizations and %d example files", total, len(dirs), len(examples))

	// Negative fixtures.
	fixtures, _ := filepath.Glob(filepath.Join(harness.RepoRoot, "tests", "k8s", "invalid", "*.yaml"))
	if len(fixtures) == 0 {
		t.Fatal("no fixtures in tests/k8s/invalid")
	}
	ns := harness.Namespace(t, "manifests-invalid")
	// The fixtures' scale target exists, so KEDA judges the triggers themselves.
	secret, deployment, _ := harness.RedisWorkerExample(t, harness.LeaseRedisDB(t).URL)
	harness.Apply(t, ns, secret, deployment)
	for _, f := range fixtures {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := cluster.DecodeYAML(b)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		refused := false
		var reasons []string
		for _, o := range objs {
			if _, err := harness.Kube.Apply(context.Background(), ns, o); err != nil {
				refused = true
				reasons = append(reasons, err.Error())
			}
		}
		// A fixture the API server cannot refuse says so, and names what KEDA's operator reports.
		kedaRefuses := fixtureKedaRefusal.FindSubmatch(b)
		switch {
		case refused && kedaRefuses != nil:
			t.Errorf("%s: the API server refused it (%s), but the fixture says it accepts it", filepath.Base(f), strings.Join(reasons, "; "))
		case refused:
			t.Logf("%s refused by the API server: %s", filepath.Base(f), strings.Join(reasons, "; "))
		case kedaRefuses == nil:
			t.Errorf("%s: the API server accepted this negative fixture", filepath.Base(f))
		default:
			for _, o := range objs {
				msg := harness.WaitNotReady(t, ns, o.GetName(), string(kedaRefuses[1]))
				t.Logf("%s accepted by the API server, refused by KEDA: Ready=False: %s", filepath.Base(f), msg)
			}
		}
	}
}

var fixtureKedaRefusal = regexp.MustCompile(`(?m)^# apiserver: accepts.*\n#.*Ready=False with a message containing "([^"]+)"`)

// applySidecar renders deploy/overlays/sidecar against KEDA's own config/manager/manager.yaml and
// applies it; the result must keep KEDA's container as it was and add the scaler beside it.
func applySidecar(t testing.TB) int {
	t.Helper()
	kedaDir := harness.ModuleDir(t, ".", "github.com/kedacore/keda/v2")
	manager, err := os.ReadFile(filepath.Join(kedaDir, "config", "manager", "manager.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	if err := os.WriteFile(filepath.Join(tmp, "manager.yaml"), manager, 0o644); err != nil {
		t.Fatal(err)
	}
	component, _ := filepath.Rel(tmp, filepath.Join(harness.RepoRoot, "deploy", "overlays", "sidecar"))
	ns := harness.Namespace(t, "manifests-sidecar")
	kust := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: %s\nresources: [manager.yaml]\ncomponents: [%s]\n", ns, component)
	if err := os.WriteFile(filepath.Join(tmp, "kustomization.yaml"), []byte(kust), 0o644); err != nil {
		t.Fatal(err)
	}
	rendered := harness.Kustomize(t, tmp, "--load-restrictor=LoadRestrictionsNone")
	original, err := cluster.DecodeYAML(manager)
	if err != nil {
		t.Fatal(err)
	}
	var dep, orig *unstructured.Unstructured
	for _, o := range rendered {
		if o.GetKind() == "Deployment" && o.GetName() == "keda-operator" {
			dep = o
		}
	}
	for _, o := range original {
		if o.GetKind() == "Deployment" && o.GetName() == "keda-operator" {
			orig = o
		}
	}
	if dep == nil || orig == nil {
		t.Fatal("KEDA's config/manager/manager.yaml has no Deployment keda-operator")
	}
	n := harness.ApplyAll(t, "deploy/overlays/sidecar on KEDA's config/manager/manager.yaml", ns, rendered)
	applied, err := harness.Kube.Client.AppsV1().Deployments(ns).Get(context.Background(), "keda-operator", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	origContainers, _, _ := unstructured.NestedSlice(orig.Object, "spec", "template", "spec", "containers")
	want := map[string]string{"celery-keda-scaler": ""}
	for _, c := range origContainers {
		m := c.(map[string]any)
		want[m["name"].(string)], _ = m["image"].(string)
	}
	got := map[string]string{}
	for _, c := range applied.Spec.Template.Spec.Containers {
		got[c.Name] = c.Image
	}
	if len(got) != len(want) {
		t.Fatalf("keda-operator with the sidecar has containers %v, want KEDA's %v and celery-keda-scaler", got, want)
	}
	for name, image := range want {
		if _, ok := got[name]; !ok {
			t.Fatalf("keda-operator with the sidecar has no container %s: %v", name, got)
		}
		if name != "celery-keda-scaler" && got[name] != image {
			t.Fatalf("the sidecar changed KEDA's container %s: image %s, want %s", name, got[name], image)
		}
	}
	return n
}
