package e2e

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// writeServerCert issues a server certificate for 127.0.0.1 from the cluster's CA and replaces
// tls.crt/tls.key in dir by rename (a reader never sees half a file).
func writeServerCert(t testing.TB, dir, cn string) {
	t.Helper()
	leaf, err := kube.CA.Issue(cn, nil, "127.0.0.1", "localhost")
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
	dir := t.TempDir()
	writeServerCert(t, dir, "celery-keda-scaler")
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), kube.CA.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := startScaler(os.Getenv("CKS_SCALER_BIN"), "scaler-tls", []string{
		"--tls-cert-file", filepath.Join(dir, "tls.crt"), "--tls-key-file", filepath.Join(dir, "tls.key"),
		"--tls-client-ca-file", filepath.Join(dir, "ca.crt"), "--tls-reload-interval", "1s",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.stop)

	client, err := kube.CA.Issue("keda-operator", nil)
	if err != nil {
		t.Fatal(err)
	}
	clientSecret := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "celery-keda-scaler-client-tls", "namespace": kube.KedaNamespace},
		"stringData": map[string]any{"ca.crt": string(kube.CA.CertPEM), "tls.crt": string(client.CertPEM), "tls.key": string(client.KeyPEM)},
	}}
	cta := find(t, readExample(t, "deploy/overlays/tls/cert-manager/cluster-trigger-authentication.yaml"), "ClusterTriggerAuthentication")
	apply(t, "", clientSecret, cta)

	broker := e2eBroker()
	pub := newPublisher(t, broker)
	pub.purge(t, "celery", "priority")
	ns := namespace(t, nsName(t, ""))
	secret, deployment, _ := exampleWorker(t)
	so := find(t, readExample(t, "deploy/examples/tls/scaledobject.yaml"), "ScaledObject")
	setTrigger(t, so, "scalerAddress", s.Addr)
	set(t, so, int64(5), "spec", "cooldownPeriod")
	apply(t, ns, secret, deployment, so)
	waitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	rw := watchReplicas(t, ns, deployment.GetName())
	pub.publish(t, "celery", 1, 0)
	if _, ok := rw.waitFor(1, 30*time.Second); !ok {
		t.Fatalf("over mTLS: one task, replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
	}

	// The same ScaledObject over mTLS on the other brokers' worker examples.
	for _, name := range []string{"rabbitmq", "sqs"} {
		t.Run(name, func(t *testing.T) {
			ns := namespace(t, nsName(t, ""))
			b := newExampleBroker(t, name, ns)
			secret, deployment, _ := b.workerExample(t)
			so := find(t, readExample(t, "deploy/examples/tls/scaledobject.yaml"), "ScaledObject")
			b.fix(t, so)
			setTrigger(t, so, "queues", "celery")
			setTrigger(t, so, "scalerAddress", s.Addr)
			bpub := b.publisher(t)
			// The queue exists and is empty before KEDA reads it (a missing queue is an error).
			bpub.publish(t, "celery", 1, 0)
			bpub.purge(t, "celery")
			apply(t, ns, secret, deployment, so)
			waitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
			rw := watchReplicas(t, ns, deployment.GetName())
			bpub.publish(t, "celery", 1, 0)
			if _, ok := rw.waitFor(1, 30*time.Second); !ok {
				t.Fatalf("over mTLS on %s: one task, replicas %d, want 1\n%s", name, rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
			}
		})
	}

	// Only the CA, no client certificate: the scaler refuses the handshake.
	nsNoCert := namespace(t, nsName(t, "no-client-cert"))
	caOnly := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "scaler-ca"},
		"stringData": map[string]any{"ca.crt": string(kube.CA.CertPEM)},
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
	set(t, noCert, triggers, "spec", "triggers")
	secret2, deployment2, _ := exampleWorker(t)
	apply(t, nsNoCert, secret2, deployment2, caOnly, ta, noCert)
	msg := waitNotReady(t, nsNoCert, noCert.GetName(), "no metric specs returned from scalers")
	line := waitLogLine(t, kube.OperatorLog, `"namespace": "`+nsNoCert+`"`, "Unavailable", 30*time.Second)
	t.Logf("without a client certificate: Ready=False: %s; operator log: %.300s", msg, line)
	if failures, err := s.counter("celery_keda_tls_handshake_failures_total"); err != nil || failures < 1 {
		t.Fatalf("celery_keda_tls_handshake_failures_total = %v (err %v), want >= 1", failures, err)
	}

	// Rotation: a new server certificate on disk, picked up without restart; KEDA keeps scaling.
	reloads := func() float64 {
		v, _ := s.counter(`celery_keda_tls_reloads_total{result="ok"}`)
		return v
	}
	before := reloads()
	writeServerCert(t, dir, "celery-keda-scaler-rotated")
	deadline := time.Now().Add(20 * time.Second)
	for reloads() <= before {
		if time.Now().After(deadline) {
			t.Fatalf("the scaler did not reload the rotated certificate within 20s\n%s", readFile(t, s.log))
		}
		time.Sleep(200 * time.Millisecond)
	}
	pub.purge(t, "celery", "priority")
	if _, ok := rw.waitFor(0, 90*time.Second); !ok {
		t.Fatalf("after rotation, queue empty: replicas %d, want 0\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
	}
	pub.publish(t, "celery", 1, 0)
	if _, ok := rw.waitFor(1, 30*time.Second); !ok {
		t.Fatalf("after rotation: one task, replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
	}
	t.Logf("over mTLS, across a certificate rotation: %v", rw.changes())
	pub.purge(t, "celery", "priority")
}
