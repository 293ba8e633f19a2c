package e2e

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// writeServerCert issues a server certificate for 127.0.0.1 from the cluster's CA and replaces
// tls.crt/tls.key in dir by rename (a reader never sees half a file).
func writeServerCert(t testing.TB, dir, cn string) {
	t.Helper()
	leaf, err := harness.Kube.CA.Issue(cn, nil, "127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"tls.crt": leaf.CertPEM, "tls.key": leaf.KeyPEM} {
		tmp := filepath.Join(dir, "."+name+".tmp")
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestTLSAndMutualTLS: a scaler with --tls-cert-file/--tls-key-file/--tls-client-ca-file; KEDA gets
// caCert, tlsClientCert and tlsClientKey through the project's ClusterTriggerAuthentication
// (deploy/overlays/tls/cert-manager, Secret written here instead of by cert-manager) and scales
// deploy/examples/tls/scaledobject.yaml on each broker's worker example. A trigger whose
// TriggerAuthentication has no client certificate is refused. The server certificate is rotated
// on disk; KEDA keeps scaling.
func TestTLSAndMutualTLS(t *testing.T) {
	t.Parallel()
	// The ClusterTriggerAuthentication and the client Secret in KEDA's namespace are the ones
	// TestManifestsApply applies from deploy/overlays/tls/cert-manager too.
	harness.Exclusive(t, harness.KedaObjects)
	dir := t.TempDir()
	writeServerCert(t, dir, "celery-keda-scaler")
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), harness.Kube.CA.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := harness.StartScaler("scaler-tls", []string{
		"--tls-cert-file", filepath.Join(dir, "tls.crt"), "--tls-key-file", filepath.Join(dir, "tls.key"),
		"--tls-client-ca-file", filepath.Join(dir, "ca.crt"), "--tls-reload-interval", "1s",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)

	client, err := harness.Kube.CA.Issue("keda-operator", nil)
	if err != nil {
		t.Fatal(err)
	}
	clientSecret := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "celery-keda-scaler-client-tls", "namespace": harness.Kube.KedaNamespace},
		"stringData": map[string]any{"ca.crt": string(harness.Kube.CA.CertPEM), "tls.crt": string(client.CertPEM), "tls.key": string(client.KeyPEM)},
	}}
	cta := harness.Find(t, harness.ReadExample(t, "deploy/overlays/tls/cert-manager/cluster-trigger-authentication.yaml"), "ClusterTriggerAuthentication")
	harness.Apply(t, "", clientSecret, cta)

	broker := harness.LeaseRedisDB(t).URL
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, "celery", "priority")
	ns := harness.Namespace(t, harness.NSName(t, ""))
	secret, deployment, _ := harness.RedisWorkerExample(t, broker)
	so := harness.Find(t, harness.ReadExample(t, "deploy/examples/tls/scaledobject.yaml"), "ScaledObject")
	harness.SetTrigger(t, so, "scalerAddress", s.Addr)
	harness.Set(t, so, int64(5), "spec", "cooldownPeriod")
	harness.Apply(t, ns, secret, deployment, so)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	rw := harness.WatchReplicas(t, ns, deployment.GetName())
	pub.Publish(t, "celery", 1, 0)
	if _, ok := rw.WaitFor(1, 30*time.Second); !ok {
		t.Fatalf("over mTLS: one task, replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}

	// The same ScaledObject over mTLS on the other brokers' worker examples.
	for _, name := range []string{"rabbitmq", "sqs"} {
		t.Run(name, func(t *testing.T) {
			ns := harness.Namespace(t, harness.NSName(t, ""))
			b := harness.NewExampleBroker(t, name, ns)
			secret, deployment, _ := b.WorkerExample(t)
			so := harness.Find(t, harness.ReadExample(t, "deploy/examples/tls/scaledobject.yaml"), "ScaledObject")
			b.Fix(t, so)
			harness.SetTrigger(t, so, "queues", "celery")
			harness.SetTrigger(t, so, "scalerAddress", s.Addr)
			bpub := b.Publisher(t)
			// The queue exists and is empty before KEDA reads it (a missing queue is an error).
			bpub.Publish(t, "celery", 1, 0)
			bpub.Purge(t, "celery")
			harness.Apply(t, ns, secret, deployment, so)
			harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
			rw := harness.WatchReplicas(t, ns, deployment.GetName())
			bpub.Publish(t, "celery", 1, 0)
			if _, ok := rw.WaitFor(1, 30*time.Second); !ok {
				t.Fatalf("over mTLS on %s: one task, replicas %d, want 1\n%s", name, rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
			}
		})
	}

	// Only the CA, no client certificate: the scaler refuses the handshake.
	nsNoCert := harness.Namespace(t, harness.NSName(t, "no-client-cert"))
	caOnly := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "scaler-ca"},
		"stringData": map[string]any{"ca.crt": string(harness.Kube.CA.CertPEM)},
	}}
	ta := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
		"metadata": map[string]any{"name": "ca-only"},
		"spec": map[string]any{"secretTargetRef": []any{
			map[string]any{"parameter": "caCert", "name": "scaler-ca", "key": "ca.crt"},
		}},
	}}
	noCert := so.DeepCopy()
	triggers, _, _ := unstructured.NestedSlice(noCert.Object, "spec", "triggers")
	triggers[0].(map[string]any)["authenticationRef"] = map[string]any{"name": "ca-only"}
	harness.Set(t, noCert, triggers, "spec", "triggers")
	secret2, deployment2, _ := harness.RedisWorkerExample(t, broker)
	harness.Apply(t, nsNoCert, secret2, deployment2, caOnly, ta, noCert)
	msg := harness.WaitNotReady(t, nsNoCert, noCert.GetName(), "no metric specs returned from scalers")
	line := harness.WaitLogLine(t, harness.Kube.OperatorLog, `"namespace": "`+nsNoCert+`"`, "Unavailable", 30*time.Second)
	t.Logf("without a client certificate: Ready=False: %s; operator log: %.300s", msg, line)
	if failures, err := s.Counter("celery_keda_tls_handshake_failures_total"); err != nil || failures < 1 {
		t.Fatalf("celery_keda_tls_handshake_failures_total = %v (err %v), want >= 1", failures, err)
	}

	// Rotation: a new server certificate on disk, picked up without restart; KEDA keeps scaling.
	reloads := func() float64 {
		v, _ := s.Counter(`celery_keda_tls_reloads_total{result="ok"}`)
		return v
	}
	before := reloads()
	writeServerCert(t, dir, "celery-keda-scaler-rotated")
	deadline := time.Now().Add(20 * time.Second)
	for reloads() <= before {
		if time.Now().After(deadline) {
			t.Fatalf("the scaler did not reload the rotated certificate within 20s\n%s", harness.ReadFile(t, s.Log))
		}
		time.Sleep(200 * time.Millisecond)
	}
	pub.Purge(t, "celery", "priority")
	if _, ok := rw.WaitFor(0, 90*time.Second); !ok {
		t.Fatalf("after rotation, queue empty: replicas %d, want 0\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	pub.Publish(t, "celery", 1, 0)
	if _, ok := rw.WaitFor(1, 30*time.Second); !ok {
		t.Fatalf("after rotation: one task, replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	t.Logf("over mTLS, across a certificate rotation: %v", rw.Changes())
	pub.Purge(t, "celery", "priority")
}
