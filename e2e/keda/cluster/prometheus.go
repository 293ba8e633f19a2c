package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
)

// A Prometheus server beside the control plane, which Prometheus Adapter (prometheusadapter.go)
// queries: Debian's prometheus package, started as a process, its storage and log in the work
// directory.

// StartPrometheus starts the Prometheus binary bin scraping the /metrics of every target
// (host:port) every interval, and returns its URL once it is ready. Stop ends it.
func (c *Cluster) StartPrometheus(ctx context.Context, bin string, targets []string, interval time.Duration) (string, error) {
	port, err := process.FreePort()
	if err != nil {
		return "", err
	}
	dir := c.path("prometheus")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	quoted := make([]string, len(targets))
	for i, t := range targets {
		quoted[i] = strconv.Quote(t)
	}
	config := fmt.Sprintf(`global: {scrape_interval: %s, scrape_timeout: %s, evaluation_interval: %s}
scrape_configs:
  - job_name: celery-keda-scaler
    metrics_path: /metrics
    static_configs: [{targets: [%s]}]
`, interval, interval, interval, strings.Join(quoted, ", "))
	if err := writeFile(dir, "prometheus.yml", []byte(config)); err != nil {
		return "", err
	}
	p, err := c.startBinary("prometheus", bin, nil,
		"--config.file="+c.path("prometheus", "prometheus.yml"),
		"--storage.tsdb.path="+c.path("prometheus", "data"),
		"--web.listen-address=127.0.0.1:"+strconv.Itoa(port),
		"--log.level=info")
	if err != nil {
		return "", err
	}
	c.PrometheusLog = p.Log
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	hc := &http.Client{Timeout: 2 * time.Second}
	if err := p.WaitFor(ctx, "/-/ready", 60*time.Second, func() error {
		_, err := process.HTTPGet(hc, url+"/-/ready")
		return err
	}); err != nil {
		return "", err
	}
	var info struct {
		Data struct {
			Version string `json:"version"`
		} `json:"data"`
	}
	if body, err := process.HTTPGet(hc, url+"/api/v1/status/buildinfo"); err == nil {
		_ = json.Unmarshal([]byte(body), &info)
	}
	c.cfg.Log("Prometheus %s ready at %s, scraping %v every %s", info.Data.Version, url, targets, interval)
	return url, nil
}
