package cluster

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The KEDA part of the control plane: its CRDs, the operator and the metrics apiserver.

var (
	crdGVR        = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	apiServiceGVR = schema.GroupVersionResource{Group: "apiregistration.k8s.io", Version: "v1", Resource: "apiservices"}
)

// startKeda installs KEDA's CRDs from the KEDA module, starts the operator and the metrics apiserver,
// and registers the latter as the external metrics API through an ExternalName Service.
func (c *Cluster) startKeda(ctx context.Context) error {
	// All six CRDs, from the KEDA module itself: the operator starts every controller.
	crds, err := filepath.Glob(filepath.Join(c.cfg.KedaDir, "config", "crd", "bases", "*.yaml"))
	if err != nil {
		return err
	}
	if len(crds) == 0 {
		return fmt.Errorf("no CRDs in %s/config/crd/bases", c.cfg.KedaDir)
	}
	for _, f := range crds {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		if _, err := c.ApplyYAML(ctx, "", b); err != nil {
			return fmt.Errorf("apply %s: %w", f, err)
		}
	}
	for _, f := range crds {
		name, err := crdName(f)
		if err != nil {
			return err
		}
		if err := c.waitCRDEstablished(ctx, name); err != nil {
			return err
		}
	}
	c.cfg.Log("Installed %d KEDA CRDs from %s", len(crds), c.cfg.KedaDir)
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: c.KedaNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}

	grpcPort, err := process.FreePort()
	if err != nil {
		return err
	}
	metricsPort, err := process.FreePort()
	if err != nil {
		return err
	}
	probePort, err := process.FreePort()
	if err != nil {
		return err
	}
	env := []string{
		"KUBECONFIG=" + c.Kubeconfig,
		"WATCH_NAMESPACE=",
		"KEDA_CLUSTER_OBJECT_NAMESPACE=" + c.KedaNamespace,
		"POD_NAMESPACE=" + c.KedaNamespace,
	}
	op, err := c.start("operator", env,
		"--kubeconfig="+c.Kubeconfig,
		"--metrics-bind-address=127.0.0.1:"+strconv.Itoa(metricsPort),
		"--health-probe-bind-address=127.0.0.1:"+strconv.Itoa(probePort),
		"--metrics-service-bind-address=127.0.0.1:"+strconv.Itoa(grpcPort),
		"--cert-dir="+c.path("keda-certs"),
		"--ca-dir="+c.path("keda-certs"),
		"--enable-cert-rotation=false",
		"--zap-log-level=info", "--zap-encoder=console")
	if err != nil {
		return err
	}
	c.OperatorLog = op.Log
	hc := &http.Client{Timeout: 2 * time.Second}
	if err := op.WaitFor(ctx, "/readyz", 90*time.Second, func() error {
		_, err := process.HTTPGet(hc, fmt.Sprintf("http://127.0.0.1:%d/readyz", probePort))
		return err
	}); err != nil {
		return err
	}

	securePort, err := process.FreePort()
	if err != nil {
		return err
	}
	adapterMetrics, err := process.FreePort()
	if err != nil {
		return err
	}
	ac := c.path("adapter-certs")
	ad, err := c.start("adapter", env,
		"--kubeconfig="+c.Kubeconfig,
		"--lister-kubeconfig="+c.Kubeconfig,
		"--authentication-kubeconfig="+c.Kubeconfig,
		"--authorization-kubeconfig="+c.Kubeconfig,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(securePort),
		"--cert-dir="+ac,
		"--tls-cert-file="+filepath.Join(ac, "tls.crt"), "--tls-private-key-file="+filepath.Join(ac, "tls.key"),
		"--metrics-service-address=127.0.0.1:"+strconv.Itoa(grpcPort),
		"--port="+strconv.Itoa(adapterMetrics),
		"--zap-log-level=info", "--zap-encoder=console")
	if err != nil {
		return err
	}
	c.AdapterLog = ad.Log
	// The aggregator reaches the adapter through an ExternalName Service: for that type it dials
	// https://<externalName>:<APIService port> (EndpointSlices refuse loopback addresses).
	svc := fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: keda-metrics-apiserver, namespace: %s}
spec: {type: ExternalName, externalName: localhost, ports: [{name: https, port: %d}]}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.external.metrics.k8s.io}
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  caBundle: %s
  service: {namespace: %s, name: keda-metrics-apiserver, port: %d}
`, c.KedaNamespace, securePort, b64(c.CA.CertPEM), c.KedaNamespace, securePort)
	if _, err := c.ApplyYAML(ctx, "", []byte(svc)); err != nil {
		return fmt.Errorf("register the external metrics API: %w", err)
	}
	return ad.WaitFor(ctx, "Available APIService v1beta1.external.metrics.k8s.io", 120*time.Second, func() error {
		u, err := c.Dynamic.Resource(apiServiceGVR).Get(ctx, "v1beta1.external.metrics.k8s.io", metav1.GetOptions{})
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

func (c *Cluster) waitCRDEstablished(ctx context.Context, name string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		u, err := c.Dynamic.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			if cond := FindCondition(u, "Established"); cond != nil && cond["status"] == "True" {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("CRD %s not Established within 60s (last error: %v)", name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
