package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
)

// Prometheus Adapter (sigs.k8s.io/prometheus-adapter, built by e2e/scripts/build.sh as
// prometheus-adapter) serving the external metrics API from Prometheus, on a control plane without
// KEDA: only one APIService can serve external.metrics.k8s.io.

// PrometheusAdapterNamespace and PrometheusAdapterService are where the adapter is registered, as
// its own manifests name them.
const (
	PrometheusAdapterNamespace = "monitoring"
	PrometheusAdapterService   = "prometheus-adapter"
)

// StartPrometheusAdapter runs Prometheus Adapter against the Prometheus at promURL with the rules
// of configFile (its --config), relisting Prometheus' series every relist, registers it as the
// external metrics API and returns once the aggregator serves it. The cluster must have been
// started with NoKeda.
func (c *Cluster) StartPrometheusAdapter(ctx context.Context, promURL, configFile string, relist time.Duration) error {
	if !c.cfg.NoKeda {
		return fmt.Errorf("Prometheus Adapter needs a control plane without KEDA (Config.NoKeda): KEDA's metrics apiserver holds the external metrics API")
	}
	bin := filepath.Join(c.cfg.BinDir, "prometheus-adapter")
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("prometheus-adapter missing in %s (run e2e/scripts/build.sh): %w", c.cfg.BinDir, err)
	}
	certs := c.path("prometheus-adapter-certs")
	if err := os.MkdirAll(certs, 0o700); err != nil {
		return err
	}
	if err := c.servingCert(certs, PrometheusAdapterNamespace, PrometheusAdapterService); err != nil {
		return err
	}
	port, err := process.FreePort()
	if err != nil {
		return err
	}
	p, err := c.startBinary("prometheus-adapter", bin, nil, append(c.aggregatedServerArgs(certs, port),
		"--prometheus-url="+promURL,
		"--config="+configFile,
		"--metrics-relist-interval="+relist.String(),
		// The series of the last minute are listed: a scrape that comes late does not drop a
		// metric name from the API until the next relist.
		"--metrics-max-age=1m",
		"--v=2")...)
	if err != nil {
		return err
	}
	c.PrometheusAdapterLog = p.Log
	if err := c.registerExternalMetricsAPI(ctx, p, PrometheusAdapterNamespace, PrometheusAdapterService, port); err != nil {
		return err
	}
	c.cfg.Log("Prometheus Adapter serves the external metrics API (127.0.0.1:%s, rules %s)", strconv.Itoa(port), configFile)
	return nil
}
