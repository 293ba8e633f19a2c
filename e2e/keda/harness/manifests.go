package harness

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// ModuleDir returns a module's directory in the module cache, as pinned by the go.mod of dir
// (relative to e2e/keda), downloading it if needed.
func ModuleDir(t testing.TB, dir, module string) string {
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

var crdMu sync.Mutex

// InstallCRDs applies CRD files and waits until each is Established. The CRDs are cluster-scoped
// and several scenarios install the same ones: one installation at a time.
func InstallCRDs(t testing.TB, files ...string) {
	t.Helper()
	crdMu.Lock()
	defer crdMu.Unlock()
	ctx := context.Background()
	crdGVR := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := Kube.ApplyYAML(ctx, "", b)
		if err != nil {
			t.Fatalf("apply CRD %s: %v", f, err)
		}
		for _, o := range objs {
			deadline := time.Now().Add(60 * time.Second)
			for {
				u, err := Kube.Dynamic.Resource(crdGVR).Get(ctx, o.GetName(), metav1.GetOptions{})
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

// Kustomize renders a kustomization with `kubectl kustomize`.
func Kustomize(t testing.TB, dir string, extra ...string) []*unstructured.Unstructured {
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

// ApplyAll applies objects and fails the test naming each object the API server refused.
// ScaledObjects and ScaledJobs are applied with dryRun=All: fully validated and admitted, never
// stored, because KEDA would act on a stored one and its gRPC client would look up the example's
// scalerAddress (a cluster DNS name) through this machine's resolver. HorizontalPodAutoscalers
// too (deploy/examples/without-keda): the HPA controller would ask this cluster's external
// metrics API, KEDA's, every sync for a metric that only Prometheus Adapter serves.
func ApplyAll(t testing.TB, what, ns string, objs []*unstructured.Unstructured) int {
	t.Helper()
	if len(objs) == 0 {
		t.Fatalf("%s: no objects", what)
	}
	for _, o := range objs {
		apply := Kube.Apply
		if o.GetAPIVersion() == "keda.sh/v1alpha1" && (o.GetKind() == "ScaledObject" || o.GetKind() == "ScaledJob") ||
			o.GetKind() == "HorizontalPodAutoscaler" {
			apply = Kube.DryRun
		}
		if _, err := apply(context.Background(), ns, o); err != nil {
			t.Errorf("%s: the API server refused %s %s: %v", what, o.GetKind(), o.GetName(), err)
		}
	}
	return len(objs)
}

// KedaObjects names the lock of the objects the TLS scenario and the manifests scenario both write:
// the ClusterTriggerAuthentication celery-keda-scaler-tls of deploy/overlays/tls/cert-manager and
// objects in KEDA's namespace.
const KedaObjects = "keda-namespace-and-cluster-trigger-authentications"

var exclusive sync.Map // name -> *sync.Mutex

// Exclusive holds a lock of this process, by name, until the test ends: parallel tests that write
// the same cluster-scoped objects or objects in KEDA's namespace take the same name.
func Exclusive(t testing.TB, name string) {
	t.Helper()
	mu, _ := exclusive.LoadOrStore(name, &sync.Mutex{})
	mu.(*sync.Mutex).Lock()
	t.Cleanup(mu.(*sync.Mutex).Unlock)
}
