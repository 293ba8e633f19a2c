// Package cluster runs a local Kubernetes control plane and KEDA as plain processes on loopback,
// one file per component as envtest splits its control plane: kubernetes.go (etcd, kube-apiserver,
// kube-controller-manager with the deployment, replicaset, job, HPA and garbage collector
// controllers), keda.go (KEDA's CRDs, the operator, and KEDA's metrics apiserver registered as the
// external metrics API), or, on a control plane without KEDA, prometheus.go (a Prometheus server)
// and prometheusadapter.go (Prometheus Adapter registered as the external metrics API instead),
// apiservice.go (that registration), certs.go (one CA for everything), apply.go (server-side
// apply of YAML).
// Package process (cluster/process) starts, watches and stops the processes. There is no kubelet:
// pods are created but never run.
package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Config says where the binaries are and where the cluster keeps its state.
type Config struct {
	// BinDir holds etcd, kube-apiserver, kube-controller-manager, operator and adapter
	// (e2e/scripts/build.sh prints it).
	BinDir string
	// KedaDir is the KEDA module's directory in the Go module cache (CRDs in config/crd/bases).
	KedaDir string
	// WorkDir receives certificates, kubeconfigs, etcd's data and one log file per process.
	WorkDir string
	// HPASyncPeriod is the HPA controller's resync (Kubernetes' default is 15 s).
	HPASyncPeriod time.Duration
	// HPADownscaleStabilization is the HPA's default scale-down window (default 5 min).
	HPADownscaleStabilization time.Duration
	// NoKeda starts the Kubernetes part only: for debugging the control plane itself, and for
	// Prometheus Adapter (StartPrometheusAdapter), which needs the external metrics API that KEDA's
	// metrics apiserver would hold.
	NoKeda bool
	// Log receives one line per start-up step.
	Log func(format string, args ...any)
}

// Cluster is a running control plane. Its clients and Apply are safe for concurrent use.
type Cluster struct {
	cfg        Config
	procs      []*process.Process
	Kubeconfig string
	Rest       *rest.Config
	Client     kubernetes.Interface
	Dynamic    dynamic.Interface
	// CA signs every certificate of the cluster; tests use it for the scaler's TLS too.
	CA *CA
	// KedaNamespace is where KEDA keeps its cluster-scoped objects' secrets and its Service.
	KedaNamespace string
	// OperatorLog is the KEDA operator's log file.
	OperatorLog string
	// AdapterLog is the metrics apiserver's log file.
	AdapterLog string
	// PrometheusLog and PrometheusAdapterLog are the log files of Prometheus and Prometheus Adapter
	// (StartPrometheus, StartPrometheusAdapter: a cluster without KEDA).
	PrometheusLog        string
	PrometheusAdapterLog string

	apiURL     string
	etcdURL    string
	mapperMu   sync.Mutex
	restMapper meta.ResettableRESTMapper
}

// Start brings the whole control plane up and returns once KEDA's metrics API is Available.
// On failure everything already started is stopped.
func Start(ctx context.Context, cfg Config) (c *Cluster, err error) {
	if cfg.Log == nil {
		cfg.Log = func(string, ...any) {}
	}
	if cfg.HPASyncPeriod == 0 {
		cfg.HPASyncPeriod = 15 * time.Second
	}
	if cfg.HPADownscaleStabilization == 0 {
		cfg.HPADownscaleStabilization = 5 * time.Minute
	}
	bins := []string{"etcd", "kube-apiserver", "kube-controller-manager", "operator", "adapter"}
	if cfg.NoKeda {
		bins = bins[:3]
	}
	for _, b := range bins {
		if _, err := os.Stat(filepath.Join(cfg.BinDir, b)); err != nil {
			return nil, fmt.Errorf("control plane binary %s missing in %s (run e2e/scripts/build.sh): %w", b, cfg.BinDir, err)
		}
	}
	for _, d := range []string{"pki", "logs", "etcd", "keda-certs", "adapter-certs"} {
		if err := os.MkdirAll(filepath.Join(cfg.WorkDir, d), 0o700); err != nil {
			return nil, err
		}
	}
	started := &Cluster{cfg: cfg, KedaNamespace: "keda"}
	c = started
	defer func() {
		// `return nil, err` has set c to nil by now: stop what was started.
		if err != nil {
			started.Stop()
		}
	}()
	if err := c.writeCerts(); err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	if err := c.startKubernetes(ctx); err != nil {
		return nil, err
	}
	if cfg.NoKeda {
		return c, nil
	}
	if err := c.startKeda(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Pid is the process id of a started control-plane process ("etcd", "kube-apiserver",
// "kube-controller-manager", "operator", "adapter", "prometheus", "prometheus-adapter"), or 0 when
// it does not run.
func (c *Cluster) Pid(name string) int {
	for _, p := range c.procs {
		if p.Name == name {
			return p.Pid()
		}
	}
	return 0
}

// Stop ends every process (SIGTERM, then SIGKILL after 10 s), newest first.
func (c *Cluster) Stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].Stop(10 * time.Second)
	}
	c.procs = nil
}

func (c *Cluster) path(parts ...string) string {
	return filepath.Join(append([]string{c.cfg.WorkDir}, parts...)...)
}

// start runs one of the control plane's binaries from BinDir, its log in <WorkDir>/logs.
func (c *Cluster) start(name string, env []string, args ...string) (*process.Process, error) {
	return c.startBinary(name, filepath.Join(c.cfg.BinDir, name), env, args...)
}

// startBinary runs bin as the component name, its log in <WorkDir>/logs/<name>.log; Stop ends it.
func (c *Cluster) startBinary(name, bin string, env []string, args ...string) (*process.Process, error) {
	p, err := process.Start(name, bin, c.path("logs", name+".log"), env, args...)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	c.cfg.Log("Started %s (pid %d, log %s)", name, p.Pid(), p.Log)
	return p, nil
}

// FindCondition returns status.conditions[type=t] of an object, or nil.
func FindCondition(u *unstructured.Unstructured, t string) map[string]any {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, raw := range conds {
		if m, ok := raw.(map[string]any); ok && m["type"] == t {
			return m
		}
	}
	return nil
}
