package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// moduleDir returns a module's directory in the module cache, as pinned by the go.mod of dir
// (relative to e2e/keda), downloading it if needed.
func moduleDir(t testing.TB, dir, module string) string {
	t.Helper()
	cmd := exec.Command("go", "mod", "download", "-json", module)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go mod download %s in %s: %v\n%s", module, dir, err, out)
	}
	m := regexp.MustCompile(`"Dir": "([^"]+)"`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("go mod download %s: no Dir in %s", module, out)
	}
	return string(m[1])
}

// installCRDs applies CRD files and waits until each is Established.
func installCRDs(t testing.TB, files ...string) {
	t.Helper()
	ctx := context.Background()
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := kube.ApplyYAML(ctx, "", b)
		if err != nil {
			t.Fatalf("apply CRD %s: %v", f, err)
		}
		for _, o := range objs {
			deadline := time.Now().Add(60 * time.Second)
			for {
				u, err := kube.Dynamic.Resource(crdGVR).Get(ctx, o.GetName(), metav1.GetOptions{})
				if err == nil {
					if c := cluster.FindCondition(u, "Established"); c != nil && c["status"] == "True" {
						break
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("CRD %s not Established within 60s", o.GetName())
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
}

func kustomize(t testing.TB, dir string, extra ...string) []*unstructured.Unstructured {
	t.Helper()
	args := append([]string{"kustomize"}, extra...)
	cmd := exec.Command("kubectl", append(args, dir)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, stderr.String())
	}
	objs, err := cluster.DecodeYAML(out)
	if err != nil {
		t.Fatalf("kubectl kustomize %s: %v", dir, err)
	}
	return objs
}

// applyAll applies objects and fails the test naming each object the API server refused.
// ScaledObjects and ScaledJobs are applied with dryRun=All: fully validated and admitted, never
// stored, because KEDA would act on a stored one and its gRPC client would look up the example's
// scalerAddress (a cluster DNS name) through this machine's resolver.
func applyAll(t testing.TB, what, ns string, objs []*unstructured.Unstructured) int {
	t.Helper()
	if len(objs) == 0 {
		t.Fatalf("%s: no objects", what)
	}
	for _, o := range objs {
		apply := kube.Apply
		if o.GetAPIVersion() == "keda.sh/v1alpha1" && (o.GetKind() == "ScaledObject" || o.GetKind() == "ScaledJob") {
			apply = kube.DryRun
		}
		if _, err := apply(context.Background(), ns, o); err != nil {
			t.Errorf("%s: the API server refused %s %s: %v", what, o.GetKind(), o.GetName(), err)
		}
	}
	return len(objs)
}

// TestManifestsApply: every kustomization of deploy/ (base, overlays, components through the test
// kustomizations, the IRSA example) and every example file go into the real API server by
// server-side apply with strict field validation, with KEDA's, cert-manager's and the Prometheus
// Operator's CRDs installed from their Go modules; the sidecar component is applied to KEDA's own
// operator Deployment (config/manager/manager.yaml of the pinned KEDA module); every negative
// fixture of tests/k8s/invalid is refused.
func TestManifestsApply(t *testing.T) {
	certManager := moduleDir(t, "../crds", "github.com/cert-manager/cert-manager")
	promOperator := moduleDir(t, "../crds", "github.com/prometheus-operator/prometheus-operator")
	crds, _ := filepath.Glob(filepath.Join(certManager, "deploy", "crds", "cert-manager.io_*.yaml"))
	crds = append(crds, filepath.Join(promOperator, "example", "prometheus-operator-crd", "monitoring.coreos.com_servicemonitors.yaml"))
	installCRDs(t, crds...)

	total := 0
	// Kustomizations (Components are rendered through tests/k8s/components).
	var dirs []string
	for _, root := range []string{"deploy", "tests/k8s/components"} {
		_ = filepath.WalkDir(filepath.Join(repoRoot, root), func(p string, d os.DirEntry, err error) error {
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
		rel, _ := filepath.Rel(repoRoot, dir)
		ns := namespace(t, "manifests-"+strings.ReplaceAll(strings.ReplaceAll(rel, "/", "-"), "_", "-"))
		total += applyAll(t, "kubectl kustomize "+rel, ns, kustomize(t, dir))
	}
	// Example files (kustomization.yaml files are rendered above).
	examples, _ := filepath.Glob(filepath.Join(repoRoot, "deploy", "examples", "*", "*.yaml"))
	for _, f := range examples {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		rel, _ := filepath.Rel(repoRoot, f)
		ns := namespace(t, "manifests-"+strings.TrimSuffix(strings.ReplaceAll(strings.TrimPrefix(rel, "deploy/examples/"), "/", "-"), ".yaml"))
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := cluster.DecodeYAML(b)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		total += applyAll(t, rel, ns, objs)
	}

	// The sidecar component on KEDA's real operator Deployment.
	total += applySidecar(t)
	t.Logf("the API server accepted %d objects from %d kustomizations and %d example files", total, len(dirs), len(examples))

	// Negative fixtures.
	fixtures, _ := filepath.Glob(filepath.Join(repoRoot, "tests", "k8s", "invalid", "*.yaml"))
	if len(fixtures) == 0 {
		t.Fatal("no fixtures in tests/k8s/invalid")
	}
	ns := namespace(t, "manifests-invalid")
	// The fixtures' scale target exists, so KEDA judges the triggers themselves.
	secret, deployment, _ := exampleWorker(t)
	apply(t, ns, secret, deployment)
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
			if _, err := kube.Apply(context.Background(), ns, o); err != nil {
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
				msg := waitNotReady(t, ns, o.GetName(), string(kedaRefuses[1]))
				t.Logf("%s accepted by the API server, refused by KEDA: Ready=False: %s", filepath.Base(f), msg)
			}
		}
	}
}

var fixtureKedaRefusal = regexp.MustCompile(`(?m)^# apiserver: accepts.*\n#.*Ready=False with a message containing "([^"]+)"`)

// waitNotReady waits for KEDA to mark a ScaledObject Ready=False with a message containing want.
func waitNotReady(t testing.TB, ns, name, want string) string {
	t.Helper()
	return waitConditionMessage(t, ns, name, "Ready", "False", want, 60*time.Second)
}

// applySidecar renders deploy/overlays/sidecar against KEDA's own config/manager/manager.yaml and
// applies it; the result must keep KEDA's container as it was and add the scaler beside it.
func applySidecar(t testing.TB) int {
	t.Helper()
	kedaDir := moduleDir(t, ".", "github.com/kedacore/keda/v2")
	manager, err := os.ReadFile(filepath.Join(kedaDir, "config", "manager", "manager.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	if err := os.WriteFile(filepath.Join(tmp, "manager.yaml"), manager, 0o644); err != nil {
		t.Fatal(err)
	}
	component, _ := filepath.Rel(tmp, filepath.Join(repoRoot, "deploy", "overlays", "sidecar"))
	ns := namespace(t, "manifests-sidecar")
	kust := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: %s\nresources: [manager.yaml]\ncomponents: [%s]\n", ns, component)
	if err := os.WriteFile(filepath.Join(tmp, "kustomization.yaml"), []byte(kust), 0o644); err != nil {
		t.Fatal(err)
	}
	rendered := kustomize(t, tmp, "--load-restrictor=LoadRestrictionsNone")
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
	n := applyAll(t, "deploy/overlays/sidecar on KEDA's config/manager/manager.yaml", ns, rendered)
	applied, err := kube.Client.AppsV1().Deployments(ns).Get(context.Background(), "keda-operator", metav1.GetOptions{})
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
