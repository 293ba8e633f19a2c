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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The KEDA part of the control plane: its CRDs, the operator and the metrics apiserver.

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// startKeda installs KEDA's CRDs from the KEDA module, starts the operator and the metrics apiserver,
// and registers the latter as the external metrics API (apiservice.go).
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
	if err := c.ensureNamespace(ctx, c.KedaNamespace); err != nil {
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
	ad, err := c.start("adapter", env, append(c.aggregatedServerArgs(c.path("adapter-certs"), securePort),
		"--kubeconfig="+c.Kubeconfig,
		"--metrics-service-address=127.0.0.1:"+strconv.Itoa(grpcPort),
		"--port="+strconv.Itoa(adapterMetrics),
		"--zap-log-level=info", "--zap-encoder=console")...)
	if err != nil {
		return err
	}
	c.AdapterLog = ad.Log
	return c.registerExternalMetricsAPI(ctx, ad, c.KedaNamespace, "keda-metrics-apiserver", securePort)
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
