package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The external metrics API (external.metrics.k8s.io) as the aggregator serves it: one server
// registered as its APIService, KEDA's metrics apiserver (keda.go) or Prometheus Adapter
// (prometheusadapter.go). Only one can be registered: a cluster has one or the other.

var apiServiceGVR = schema.GroupVersionResource{Group: "apiregistration.k8s.io", Version: "v1", Resource: "apiservices"}

// ExternalMetricsAPI is the APIService of the external metrics API.
const ExternalMetricsAPI = "v1beta1.external.metrics.k8s.io"

// registerExternalMetricsAPI registers the server p listens with on 127.0.0.1:port (TLS, with a
// certificate for <svc>.<ns>.svc signed by the cluster's CA: see servingCert) as the external
// metrics API, and returns once the aggregator serves it.
func (c *Cluster) registerExternalMetricsAPI(ctx context.Context, p *process.Process, ns, svc string, port int) error {
	if err := c.ensureNamespace(ctx, ns); err != nil {
		return err
	}
	// The aggregator reaches the server through an ExternalName Service: for that type it dials
	// https://<externalName>:<APIService port> (EndpointSlices refuse loopback addresses).
	objs := fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %s, namespace: %s}
spec: {type: ExternalName, externalName: localhost, ports: [{name: https, port: %d}]}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: %s}
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  caBundle: %s
  service: {namespace: %s, name: %s, port: %d}
`, svc, ns, port, ExternalMetricsAPI, b64(c.CA.CertPEM), ns, svc, port)
	if _, err := c.ApplyYAML(ctx, "", []byte(objs)); err != nil {
		return fmt.Errorf("register the external metrics API: %w", err)
	}
	return p.WaitFor(ctx, "Available APIService "+ExternalMetricsAPI, 120*time.Second, func() error {
		u, err := c.Dynamic.Resource(apiServiceGVR).Get(ctx, ExternalMetricsAPI, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cond := FindCondition(u, "Available")
		if cond == nil || cond["status"] != "True" {
			return fmt.Errorf("not Available: %v", cond)
		}
		// Available only says discovery answered; a request through the aggregator's proxy proves
		// the route and the serving certificate.
		if body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/apis/external.metrics.k8s.io/v1beta1").DoRaw(ctx); err != nil {
			return fmt.Errorf("GET /apis/external.metrics.k8s.io/v1beta1: %v: %s", err, body)
		}
		return nil
	})
}

// servingCert writes the serving certificate of an aggregated API server registered through the
// Service <svc>.<ns> into dir (tls.crt, tls.key, and the CA as ca.crt): the aggregator verifies
// the name <svc>.<ns>.svc, whatever address it dials.
func (c *Cluster) servingCert(dir, ns, svc string) error {
	leaf, err := c.CA.Issue(svc, nil, "127.0.0.1", "localhost", svc+"."+ns+".svc")
	if err != nil {
		return err
	}
	if err := leaf.Write(dir, "tls.crt", "tls.key"); err != nil {
		return err
	}
	return writeFile(dir, "ca.crt", c.CA.CertPEM)
}

// aggregatedServerArgs are the flags of an aggregated API server built on k8s.io/apiserver (both
// adapters are): the control plane's kubeconfig (admin, in system:masters, so no RBAC objects are
// needed) for its listers and for delegated authentication and authorization, and the serving
// certificate of servingCert on 127.0.0.1:port.
func (c *Cluster) aggregatedServerArgs(certDir string, port int) []string {
	return []string{
		"--lister-kubeconfig=" + c.Kubeconfig,
		"--authentication-kubeconfig=" + c.Kubeconfig,
		"--authorization-kubeconfig=" + c.Kubeconfig,
		"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + certDir,
		"--tls-cert-file=" + filepath.Join(certDir, "tls.crt"), "--tls-private-key-file=" + filepath.Join(certDir, "tls.key"),
	}
}

func (c *Cluster) ensureNamespace(ctx context.Context, ns string) error {
	_, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}
