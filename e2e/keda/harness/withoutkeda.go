package harness

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
)

// A plain HPA without KEDA: a control plane of the test's own (the suite's has KEDA's metrics
// apiserver as the external metrics API, and only one server can hold it), Prometheus scraping
// scalers, and Prometheus Adapter serving the external metrics API from Prometheus.

// StartClusterWithoutKeda starts a control plane without KEDA for one test, in WorkDir/<test>,
// stopped when the test ends. Its HPA controller syncs every 5 s and scales down after 15 s
// without a higher recommendation.
func StartClusterWithoutKeda(t testing.TB) *cluster.Cluster {
	t.Helper()
	dir := filepath.Join(WorkDir, NSName(t, "cluster"))
	start := time.Now()
	c, err := cluster.Start(context.Background(), cluster.Config{
		BinDir:                    os.Getenv("CKS_E2E_BIN"),
		WorkDir:                   dir,
		HPASyncPeriod:             5 * time.Second,
		HPADownscaleStabilization: 15 * time.Second,
		NoKeda:                    true,
		Log:                       Logf,
	})
	if err != nil {
		t.Fatalf("the control plane without KEDA did not start: %v\n(logs in %s/logs)", err, dir)
	}
	t.Cleanup(c.Stop)
	Logf("Control plane without KEDA ready in %s (work dir %s)", time.Since(start).Round(time.Millisecond), dir)
	return c
}

// StartPrometheusAdapter starts Prometheus (Debian's package: the binary `prometheus` on PATH)
// scraping the /metrics of every target every second, and Prometheus Adapter with the rules of
// configYAML (its config file), relisting every 2 s, as kube's external metrics API. It returns
// Prometheus' URL. Everything stops with the control plane.
func StartPrometheusAdapter(t testing.TB, kube *cluster.Cluster, targets []string, configYAML string) string {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus is not installed: the plain-HPA scenario runs Debian's Prometheus (apt-get install prometheus; scripts/test-env.sh installs it): %v", err)
	}
	ctx := context.Background()
	promURL, err := kube.StartPrometheus(ctx, bin, targets, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(t.TempDir(), "prometheus-adapter.yaml")
	if err := os.WriteFile(config, []byte(configYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := kube.StartPrometheusAdapter(ctx, promURL, config, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	return promURL
}
