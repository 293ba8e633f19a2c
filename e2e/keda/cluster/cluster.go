// Package cluster runs a local Kubernetes control plane and KEDA as plain processes on loopback:
// etcd, kube-apiserver, kube-controller-manager (deployment, replicaset, job, HPA and garbage
// collector controllers), the KEDA operator and KEDA's metrics apiserver registered as the
// external metrics API. There is no kubelet: pods are created but never run.
package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
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
	// NoKeda starts the Kubernetes part only (for debugging the control plane itself).
	NoKeda bool
	// Log receives one line per start-up step.
	Log func(format string, args ...any)
}

// Cluster is a running control plane.
type Cluster struct {
	cfg        Config
	procs      []*process
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
	apiURL     string
	etcdURL    string
	restMapper meta.RESTMapper
}

type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
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
	if err := c.startEtcd(ctx); err != nil {
		return nil, err
	}
	if err := c.startAPIServer(ctx); err != nil {
		return nil, err
	}
	if err := c.startControllerManager(ctx); err != nil {
		return nil, err
	}
	if cfg.NoKeda {
		return c, nil
	}
	if err := c.installKeda(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Pid is the process id of a started control-plane process ("etcd", "kube-apiserver",
// "kube-controller-manager", "operator", "adapter"), or 0 when it does not run.
func (c *Cluster) Pid(name string) int {
	for _, p := range c.procs {
		if p.name == name && p.cmd.Process != nil {
			return p.cmd.Process.Pid
		}
	}
	return 0
}

// Stop ends every process (SIGTERM, then SIGKILL after 10 s), newest first.
func (c *Cluster) Stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		p := c.procs[i]
		if p.cmd.Process == nil {
			continue
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	c.procs = nil
}

func (c *Cluster) path(parts ...string) string {
	return filepath.Join(append([]string{c.cfg.WorkDir}, parts...)...)
}

func (c *Cluster) writeCerts() error {
	ca, err := NewCA("cks-e2e-ca")
	if err != nil {
		return err
	}
	c.CA = ca
	front, err := NewCA("cks-e2e-front-proxy-ca")
	if err != nil {
		return err
	}
	pki := c.path("pki")
	if err := os.WriteFile(filepath.Join(pki, "ca.crt"), ca.CertPEM, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(pki, "front-proxy-ca.crt"), front.CertPEM, 0o600); err != nil {
		return err
	}
	type leaf struct {
		ca         *CA
		cn         string
		orgs       []string
		names      []string
		dir        string
		cert, key  string
		alsoCACopy bool
	}
	leaves := []leaf{
		{ca, "kube-apiserver", nil, []string{"127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, pki, "apiserver.crt", "apiserver.key", false},
		// Member of system:masters: needs no RBAC objects.
		{ca, "cks-e2e-admin", []string{"system:masters"}, nil, pki, "admin.crt", "admin.key", false},
		{front, "front-proxy-client", nil, nil, pki, "front-proxy-client.crt", "front-proxy-client.key", false},
		// KEDA's operator (gRPC server) and metrics apiserver (its client, and the aggregated
		// API's serving certificate) trust ca.crt of their cert dir and present tls.crt.
		{ca, "keda-operator", nil, []string{"127.0.0.1", "localhost"}, c.path("keda-certs"), "tls.crt", "tls.key", true},
		// The aggregator verifies the name <service>.<namespace>.svc, whatever address it dials.
		{ca, "keda-metrics-apiserver", nil, []string{"127.0.0.1", "localhost", "keda-metrics-apiserver." + c.KedaNamespace + ".svc"}, c.path("adapter-certs"), "tls.crt", "tls.key", true},
	}
	for _, l := range leaves {
		cert, err := l.ca.Issue(l.cn, l.orgs, l.names...)
		if err != nil {
			return err
		}
		if err := cert.Write(l.dir, l.cert, l.key); err != nil {
			return err
		}
		if l.alsoCACopy {
			if err := os.WriteFile(filepath.Join(l.dir, "ca.crt"), ca.CertPEM, 0o600); err != nil {
				return err
			}
		}
	}
	_, _, err = serviceAccountKey(pki)
	return err
}

// FreePort asks the kernel for a free loopback port.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *Cluster) start(name string, env []string, args ...string) (*process, error) {
	logPath := c.path("logs", name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(filepath.Join(c.cfg.BinDir, name), args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	// The processes die with the test binary, even when it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	c.procs = append(c.procs, p)
	c.cfg.Log("Started %s (pid %d, log %s)", name, cmd.Process.Pid, logPath)
	return p, nil
}

// waitFor polls check until it returns nil, the process exits, or the timeout passes; the error
// names the component and ends with the tail of its log.
func (c *Cluster) waitFor(ctx context.Context, p *process, what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited (%v) before %s; last check: %v\n%s", p.name, p.err, what, last, Tail(p.log, 30))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: no %s within %s; last check: %v\n%s", p.name, what, timeout, last, Tail(p.log, 30))
		}
	}
}

// Tail returns the last n lines of a file, for error messages.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return fmt.Sprintf("--- last %d lines of %s ---\n%s", len(lines), path, strings.Join(lines, "\n"))
}

func httpGet(client *http.Client, url string) (string, error) {
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return string(body), fmt.Errorf("GET %s: HTTP %d: %s", url, resp.StatusCode, bytes.TrimSpace(body))
	}
	return string(body), nil
}

func (c *Cluster) startEtcd(ctx context.Context) error {
	client, err := FreePort()
	if err != nil {
		return err
	}
	peer, err := FreePort()
	if err != nil {
		return err
	}
	cu := fmt.Sprintf("http://127.0.0.1:%d", client)
	pu := fmt.Sprintf("http://127.0.0.1:%d", peer)
	p, err := c.start("etcd", nil,
		"--name=cks-e2e", "--data-dir="+c.path("etcd"),
		"--listen-client-urls="+cu, "--advertise-client-urls="+cu,
		"--listen-peer-urls="+pu, "--initial-advertise-peer-urls="+pu,
		"--initial-cluster=cks-e2e="+pu,
		// Test data: no fsync, small quota, quiet logs.
		"--unsafe-no-fsync", "--quota-backend-bytes=1073741824", "--log-level=warn")
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 2 * time.Second}
	if err := c.waitFor(ctx, p, "health", 60*time.Second, func() error {
		body, err := httpGet(hc, cu+"/health")
		if err == nil && !strings.Contains(body, `"health":"true"`) {
			err = fmt.Errorf("unhealthy: %s", body)
		}
		return err
	}); err != nil {
		return err
	}
	c.etcdURL = cu
	return nil
}

func (c *Cluster) startAPIServer(ctx context.Context) error {
	port, err := FreePort()
	if err != nil {
		return err
	}
	pki := c.path("pki")
	pk := func(name string) string { return filepath.Join(pki, name) }
	p, err := c.start("kube-apiserver", nil,
		"--etcd-servers="+c.etcdURL,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		// Without these the apiserver advertises (and reconciles the `kubernetes` Service's
		// endpoints to) a host interface address.
		"--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
		"--tls-cert-file="+pk("apiserver.crt"), "--tls-private-key-file="+pk("apiserver.key"),
		"--client-ca-file="+pk("ca.crt"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+pk("sa.pub"), "--service-account-signing-key-file="+pk("sa.key"),
		"--authorization-mode=RBAC",
		// No ServiceAccount controller runs, so no `default` ServiceAccount exists to admit pods with.
		"--disable-admission-plugins=ServiceAccount",
		// Aggregation (KEDA's external metrics API): the front proxy's client certificate and CA.
		"--requestheader-client-ca-file="+pk("front-proxy-ca.crt"),
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file="+pk("front-proxy-client.crt"), "--proxy-client-key-file="+pk("front-proxy-client.key"),
		"--enable-aggregator-routing=false",
		"--v=1")
	if err != nil {
		return err
	}
	c.apiURL = fmt.Sprintf("https://127.0.0.1:%d", port)
	c.Kubeconfig = c.path("admin.kubeconfig")
	kc := clientcmdapi.NewConfig()
	kc.Clusters["cks-e2e"] = &clientcmdapi.Cluster{Server: c.apiURL, CertificateAuthority: pk("ca.crt")}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: pk("admin.crt"), ClientKey: pk("admin.key")}
	kc.Contexts["cks-e2e"] = &clientcmdapi.Context{Cluster: "cks-e2e", AuthInfo: "admin"}
	kc.CurrentContext = "cks-e2e"
	if err := clientcmd.WriteToFile(*kc, c.Kubeconfig); err != nil {
		return err
	}
	if c.Rest, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return err
	}
	c.Rest.QPS, c.Rest.Burst = 100, 200
	if c.Client, err = kubernetes.NewForConfig(c.Rest); err != nil {
		return err
	}
	if c.Dynamic, err = dynamic.NewForConfig(c.Rest); err != nil {
		return err
	}
	if err := c.waitFor(ctx, p, "/readyz", 120*time.Second, func() error {
		body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%v: %s", err, body)
		}
		return nil
	}); err != nil {
		return err
	}
	v, err := c.Client.Discovery().ServerVersion()
	if err != nil {
		return err
	}
	c.cfg.Log("kube-apiserver %s ready at %s", v.GitVersion, c.apiURL)
	return nil
}

func (c *Cluster) startControllerManager(ctx context.Context) error {
	port, err := FreePort()
	if err != nil {
		return err
	}
	p, err := c.start("kube-controller-manager", nil,
		"--kubeconfig="+c.Kubeconfig,
		"--authentication-kubeconfig="+c.Kubeconfig, "--authorization-kubeconfig="+c.Kubeconfig,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		"--leader-elect=false",
		"--use-service-account-credentials=false",
		"--controllers=deployment-controller,replicaset-controller,job-controller,horizontal-pod-autoscaler-controller,garbage-collector-controller",
		"--horizontal-pod-autoscaler-sync-period="+c.cfg.HPASyncPeriod.String(),
		"--horizontal-pod-autoscaler-downscale-stabilization="+c.cfg.HPADownscaleStabilization.String(),
		"--root-ca-file="+c.path("pki", "ca.crt"),
		"--v=1")
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // loopback health check of a self-signed test server
	return c.waitFor(ctx, p, "/healthz", 60*time.Second, func() error {
		_, err := httpGet(hc, fmt.Sprintf("https://127.0.0.1:%d/healthz", port))
		return err
	})
}

var (
	crdGVR        = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	apiServiceGVR = schema.GroupVersionResource{Group: "apiregistration.k8s.io", Version: "v1", Resource: "apiservices"}
)

func (c *Cluster) installKeda(ctx context.Context) error {
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

	grpcPort, err := FreePort()
	if err != nil {
		return err
	}
	metricsPort, err := FreePort()
	if err != nil {
		return err
	}
	probePort, err := FreePort()
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
	c.OperatorLog = op.log
	hc := &http.Client{Timeout: 2 * time.Second}
	if err := c.waitFor(ctx, op, "/readyz", 90*time.Second, func() error {
		_, err := httpGet(hc, fmt.Sprintf("http://127.0.0.1:%d/readyz", probePort))
		return err
	}); err != nil {
		return err
	}

	securePort, err := FreePort()
	if err != nil {
		return err
	}
	adapterMetrics, err := FreePort()
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
	c.AdapterLog = ad.log
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
	return c.waitFor(ctx, ad, "Available APIService v1beta1.external.metrics.k8s.io", 120*time.Second, func() error {
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
