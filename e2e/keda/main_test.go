package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
)

// The suite's shared state, set up once by TestMain.
var (
	kube     *cluster.Cluster
	scaler   *scalerProcess
	repoRoot string
	workDir  string
	redisURL string // base URL of the suite's Redis, without a database
	python   string
)

var (
	scaledObjectGVR = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "scaledobjects"}
	scaledJobGVR    = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "scaledjobs"}
)

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "e2e: %s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func runMain(m *testing.M) int {
	// Nothing here skips: a missing piece fails the run with what to do about it.
	need := map[string]string{}
	for _, k := range []string{"CKS_E2E_BIN", "CKS_SCALER_BIN", "CKS_REDIS_URL", "CKS_PYTHON"} {
		need[k] = os.Getenv(k)
		if need[k] == "" {
			fmt.Fprintf(os.Stderr, "e2e: %s is not set: run the suite with `bash e2e/scripts/run.sh` (or the project's test command, scripts/test.sh), which builds and starts everything it needs\n", k)
			return 1
		}
	}
	redisURL, python = strings.TrimRight(need["CKS_REDIS_URL"], "/"), need["CKS_PYTHON"]
	wd, _ := os.Getwd()
	repoRoot = filepath.Clean(filepath.Join(wd, "..", ".."))

	var err error
	workDir = os.Getenv("CKS_E2E_WORKDIR")
	if workDir == "" {
		if workDir, err = os.MkdirTemp("", "cks-e2e-"); err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
	}
	kedaDir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/kedacore/keda/v2").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: cannot find the KEDA module (go list -m github.com/kedacore/keda/v2):", err)
		return 1
	}
	ctx := context.Background()
	start := time.Now()
	kube, err = cluster.Start(ctx, cluster.Config{
		BinDir:                    need["CKS_E2E_BIN"],
		KedaDir:                   strings.TrimSpace(string(kedaDir)),
		WorkDir:                   workDir,
		HPASyncPeriod:             5 * time.Second,
		HPADownscaleStabilization: 30 * time.Second,
		Log:                       logf,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: control plane did not start: %v\n(logs in %s)\n", err, workDir)
		return 1
	}
	defer kube.Stop()
	logf("Control plane and KEDA ready in %s (work dir %s)", time.Since(start).Round(time.Millisecond), workDir)

	scaler, err = startScaler(need["CKS_SCALER_BIN"], "scaler", []string{"--result-window", scalerResultWindow.String()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer scaler.stop()

	code := m.Run()
	if code != 0 || os.Getenv("CKS_E2E_KEEP") != "" {
		fmt.Fprintf(os.Stderr, "e2e: logs of every process are in %s/logs\n", workDir)
	} else if os.Getenv("CKS_E2E_WORKDIR") == "" {
		kube.Stop()
		scaler.stop()
		_ = os.RemoveAll(workDir)
	}
	return code
}

// --- the scaler ---------------------------------------------------------------------------------

type scalerProcess struct {
	cmd   *exec.Cmd
	Addr  string // host:port of the gRPC listener, as triggers name it in scalerAddress
	admin string
	log   string
	done  chan struct{}
	once  sync.Once
}

// startScaler runs `celery-keda-scaler serve` on free loopback ports and waits for /readyz.
func startScaler(bin, name string, extraArgs []string, env ...string) (*scalerProcess, error) {
	grpcPort, err := process.FreePort()
	if err != nil {
		return nil, err
	}
	adminPort, err := process.FreePort()
	if err != nil {
		return nil, err
	}
	s := &scalerProcess{
		Addr:  fmt.Sprintf("127.0.0.1:%d", grpcPort),
		admin: fmt.Sprintf("127.0.0.1:%d", adminPort),
		log:   filepath.Join(workDir, "logs", name+".log"),
		done:  make(chan struct{}),
	}
	f, err := os.Create(s.log)
	if err != nil {
		return nil, err
	}
	args := append([]string{"serve", "--listen", s.Addr, "--admin-listen", s.admin}, extraArgs...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Stdout, s.cmd.Stderr = f, f
	s.cmd.Env = append(os.Environ(), append([]string{"RUST_LOG=info"}, env...)...)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start the scaler %s: %w", bin, err)
	}
	go func() { _ = s.cmd.Wait(); f.Close(); close(s.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get("http://" + s.admin + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				logf("Scaler %s serving on %s (admin %s)", name, s.Addr, s.admin)
				return s, nil
			}
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("the scaler exited at start-up\n%s", process.Tail(s.log, 20))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("the scaler was not ready within 30s\n%s", process.Tail(s.log, 20))
		}
	}
}

func (s *scalerProcess) stop() {
	s.once.Do(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(15 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.done
		}
	})
}

// gauge reads one unlabelled series from the scaler's /metrics.
func (s *scalerProcess) gauge(name string) (float64, error) { return s.counter(name) }

// counter reads one series, named with its labels exactly as /metrics prints them.
func (s *scalerProcess) counter(name string) (float64, error) {
	resp, err := http.Get("http://" + s.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, name+" ") {
			return strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(line, name)), 64)
		}
	}
	return 0, fmt.Errorf("no series %s in the scaler's /metrics", name)
}

// --- Celery -------------------------------------------------------------------------------------

// publisher is a long-lived tests/celery_app/publish_loop.py: publishing costs one round trip.
type publisher struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func newPublisher(t testing.TB, brokerURL string) *publisher {
	t.Helper()
	return newPublisherEnv(t, brokerURL)
}

// newPublisherEnv is newPublisher with extra environment (cks_app settings such as
// CKS_QUEUE_NAME_PREFIX).
func newPublisherEnv(t testing.TB, brokerURL string, env ...string) *publisher {
	t.Helper()
	cmd := exec.Command(python, filepath.Join(repoRoot, "tests", "celery_app", "publish_loop.py"))
	cmd.Env = append(append(os.Environ(), "CKS_BROKER="+brokerURL), env...)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start publish_loop.py: %v", err)
	}
	p := &publisher{cmd: cmd, in: in, out: bufio.NewScanner(out)}
	t.Cleanup(func() { in.Close(); _ = cmd.Wait() })
	if _, err := p.read(); err != nil {
		t.Fatalf("publish_loop.py did not start: %v", err)
	}
	return p
}

func (p *publisher) read() (map[string]any, error) {
	if !p.out.Scan() {
		return nil, fmt.Errorf("publish_loop.py exited: %v", p.out.Err())
	}
	var answer map[string]any
	if err := json.Unmarshal(p.out.Bytes(), &answer); err != nil {
		return nil, fmt.Errorf("publish_loop.py answered %q: %w", p.out.Text(), err)
	}
	if answer["ok"] != true {
		return answer, fmt.Errorf("publish_loop.py: %v", answer["error"])
	}
	return answer, nil
}

func (p *publisher) do(t testing.TB, cmd map[string]any) map[string]any {
	t.Helper()
	b, _ := json.Marshal(cmd)
	if _, err := p.in.Write(append(b, '\n')); err != nil {
		t.Fatalf("publish_loop.py: %v", err)
	}
	answer, err := p.read()
	if err != nil {
		t.Fatal(err)
	}
	return answer
}

// publish sends count `cks.sleep(seconds)` tasks to queue and returns when Celery has published them.
func (p *publisher) publish(t testing.TB, queue string, count int, seconds float64) {
	t.Helper()
	got := p.do(t, map[string]any{"op": "publish", "queue": queue, "count": count, "seconds": seconds})
	if got["published"] != float64(count) {
		t.Fatalf("published %v tasks, want %d", got["published"], count)
	}
}

func (p *publisher) purge(t testing.TB, queues ...string) {
	t.Helper()
	p.do(t, map[string]any{"op": "purge", "queues": queues})
}

// startWorker runs a real Celery worker (threads pool) on queues until the test ends.
func startWorker(t testing.TB, brokerURL string, queues []string, concurrency int) {
	t.Helper()
	startWorkerEnv(t, brokerURL, queues, concurrency, "CKS_MARKER_REDIS="+brokerURL)
}

// startWorkerEnv is startWorker with extra environment (cks_app settings such as CKS_PREFETCH).
func startWorkerEnv(t testing.TB, brokerURL string, queues []string, concurrency int, env ...string) {
	t.Helper()
	logPath := filepath.Join(workDir, "logs", strings.ReplaceAll(t.Name(), "/", "_")+"-worker.log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, "-m", "celery", "-A", "cks_app", "worker", "-P", "threads",
		"-c", strconv.Itoa(concurrency), "-Q", strings.Join(queues, ","),
		"-n", fmt.Sprintf("e2e-%d@localhost", time.Now().UnixNano()),
		"--without-mingle", "--without-gossip", "-l", "info")
	cmd.Dir = filepath.Join(repoRoot, "tests", "celery_app")
	cmd.Env = append(append(os.Environ(), "CKS_BROKER="+brokerURL), env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a Celery worker: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		f.Close()
	})
}

// --- Kubernetes helpers ---------------------------------------------------------------------------

// namespace creates a namespace for one test (namespaces are never deleted: no namespace
// controller runs, and the control plane's state is thrown away after the run).
func namespace(t testing.TB, name string) string {
	t.Helper()
	_, err := kube.Client.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	return name
}

// readExample decodes a file of deploy/examples (or any repository path).
func readExample(t testing.TB, rel string) []*unstructured.Unstructured {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := cluster.DecodeYAML(b)
	if err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	return objs
}

func find(t testing.TB, objs []*unstructured.Unstructured, kind string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind {
			return o
		}
	}
	t.Fatalf("no %s in the example", kind)
	return nil
}

func set(t testing.TB, o *unstructured.Unstructured, value any, path ...string) {
	t.Helper()
	if err := unstructured.SetNestedField(o.Object, value, path...); err != nil {
		t.Fatalf("set %v on %s %s: %v", path, o.GetKind(), o.GetName(), err)
	}
}

// setTrigger changes one metadata key of every trigger of a ScaledObject or ScaledJob.
func setTrigger(t testing.TB, o *unstructured.Unstructured, key, value string) {
	t.Helper()
	triggers, _, _ := unstructured.NestedSlice(o.Object, "spec", "triggers")
	if len(triggers) == 0 {
		t.Fatalf("%s %s has no triggers", o.GetKind(), o.GetName())
	}
	for _, tr := range triggers {
		md, _ := tr.(map[string]any)["metadata"].(map[string]any)
		md[key] = value
	}
	set(t, o, triggers, "spec", "triggers")
}

// setImage points every container at an image that is never pulled (no kubelet runs).
func setImage(t testing.TB, o *unstructured.Unstructured) {
	t.Helper()
	path := []string{"spec", "template", "spec", "containers"}
	if o.GetKind() == "ScaledJob" {
		path = []string{"spec", "jobTargetRef", "template", "spec", "containers"}
	}
	containers, _, _ := unstructured.NestedSlice(o.Object, path...)
	for _, c := range containers {
		c.(map[string]any)["image"] = "cks-e2e.invalid/celery-worker:never-pulled"
	}
	set(t, o, containers, path...)
}

// apply server-side applies objects into ns. ScaledObjects and ScaledJobs are deleted when the
// test ends, so that no later test shares the broker with their polls and streams.
func apply(t testing.TB, ns string, objs ...*unstructured.Unstructured) {
	t.Helper()
	for _, o := range objs {
		applied, err := kube.Apply(context.Background(), ns, o)
		if err != nil {
			t.Fatalf("apply %s %s in %s: %v", o.GetKind(), o.GetName(), ns, err)
		}
		gvr := map[string]schema.GroupVersionResource{"ScaledObject": scaledObjectGVR, "ScaledJob": scaledJobGVR}[o.GetKind()]
		if o.GetAPIVersion() == "keda.sh/v1alpha1" && gvr.Resource != "" {
			name, namespace := applied.GetName(), applied.GetNamespace()
			t.Cleanup(func() {
				_ = kube.Dynamic.Resource(gvr).Namespace(namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
			})
		}
	}
}

// describe says what KEDA reported about a ScaledObject or ScaledJob: its conditions, the
// namespace's events, the HPA's status and the operator's log lines about it.
func describe(ns string, gvr schema.GroupVersionResource, name string) string {
	ctx := context.Background()
	var b strings.Builder
	if u, err := kube.Dynamic.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
		fmt.Fprintf(&b, "%s %s/%s: %v\n", gvr.Resource, ns, name, err)
	} else {
		conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
		fmt.Fprintf(&b, "%s %s/%s conditions:\n", gvr.Resource, ns, name)
		for _, c := range conds {
			m := c.(map[string]any)
			fmt.Fprintf(&b, "  %v=%v %v: %v\n", m["type"], m["status"], m["reason"], m["message"])
		}
		names, _, _ := unstructured.NestedStringSlice(u.Object, "status", "externalMetricNames")
		fmt.Fprintf(&b, "  externalMetricNames: %v\n", names)
	}
	if evs, err := kube.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{}); err == nil {
		sort.Slice(evs.Items, func(i, j int) bool { return evs.Items[i].LastTimestamp.Before(&evs.Items[j].LastTimestamp) })
		fmt.Fprintf(&b, "events in %s:\n", ns)
		for _, e := range evs.Items {
			fmt.Fprintf(&b, "  %s %s %s/%s: %s (x%d)\n", e.Type, e.Reason, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Message, e.Count)
		}
	}
	if hpas, err := kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).List(ctx, metav1.ListOptions{}); err == nil {
		for _, h := range hpas.Items {
			st, _ := json.Marshal(h.Status)
			fmt.Fprintf(&b, "hpa %s status: %s\n", h.Name, st)
		}
	}
	fmt.Fprintf(&b, "operator log lines about %s/%s:\n%s", ns, name, grepLog(kube.OperatorLog, ns, 25))
	fmt.Fprintf(&b, "%s\n", process.Tail(scaler.log, 15))
	return b.String()
}

func grepLog(path, needle string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	var hits []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, needle) {
			if len(line) > 400 {
				line = line[:400] + "..."
			}
			hits = append(hits, "  "+line)
		}
	}
	if len(hits) > n {
		hits = hits[len(hits)-n:]
	}
	return strings.Join(hits, "\n")
}

// waitReady waits until a ScaledObject is Ready and KEDA has written its metric names (before
// that KEDA drops pushes) and its HPA exists.
func waitScaledObjectReady(t testing.TB, ns, name string, timeout time.Duration) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	for {
		u, err := kube.Dynamic.Resource(scaledObjectGVR).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			cond := cluster.FindCondition(u, "Ready")
			names, _, _ := unstructured.NestedStringSlice(u.Object, "status", "externalMetricNames")
			_, hpaErr := kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, "keda-hpa-"+name, metav1.GetOptions{})
			if cond != nil && cond["status"] == "True" && len(names) > 0 && hpaErr == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("ScaledObject %s/%s not Ready with metric names and an HPA within %s\n%s", ns, name, timeout, describe(ns, scaledObjectGVR, name))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// replicaWatch follows a Deployment's spec.replicas through a watch, recording when each value was
// first seen by this process.
type replicaWatch struct {
	mu      sync.Mutex
	history []replicaChange
	notify  chan struct{}
	stop    func()
}

type replicaChange struct {
	At       time.Time
	Replicas int32
}

func (c replicaChange) String() string {
	return fmt.Sprintf("%d at %s", c.Replicas, c.At.Format("15:04:05.000"))
}

func watchReplicas(t testing.TB, ns, name string) *replicaWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	rw := &replicaWatch{notify: make(chan struct{}, 1), stop: cancel}
	t.Cleanup(cancel)
	list, err := kube.Client.AppsV1().Deployments(ns).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String()})
	if err != nil || len(list.Items) != 1 {
		t.Fatalf("deployment %s/%s: %v (found %d)", ns, name, err, len(list.Items))
	}
	rw.record(list.Items[0].Spec.Replicas)
	w, err := kube.Client.AppsV1().Deployments(ns).Watch(ctx, metav1.ListOptions{
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", name).String(),
		ResourceVersion: list.ResourceVersion,
	})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer w.Stop()
		for ev := range w.ResultChan() {
			if ev.Type == watch.Modified || ev.Type == watch.Added {
				if d, ok := ev.Object.(*appsv1.Deployment); ok {
					rw.record(d.Spec.Replicas)
				}
			}
		}
	}()
	return rw
}

func (rw *replicaWatch) record(r *int32) {
	v := int32(1)
	if r != nil {
		v = *r
	}
	rw.mu.Lock()
	if n := len(rw.history); n == 0 || rw.history[n-1].Replicas != v {
		rw.history = append(rw.history, replicaChange{At: time.Now(), Replicas: v})
	}
	rw.mu.Unlock()
	select {
	case rw.notify <- struct{}{}:
	default:
	}
}

func (rw *replicaWatch) current() replicaChange {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.history[len(rw.history)-1]
}

func (rw *replicaWatch) changes() []replicaChange {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return append([]replicaChange(nil), rw.history...)
}

// waitFor returns when spec.replicas == want, with the time it was first seen.
func (rw *replicaWatch) waitFor(want int32, timeout time.Duration) (time.Time, bool) {
	deadline := time.After(timeout)
	for {
		if c := rw.current(); c.Replicas == want {
			return c.At, true
		}
		select {
		case <-rw.notify:
		case <-deadline:
			return time.Time{}, false
		}
	}
}

var unsafeName = regexp.MustCompile(`[^a-z0-9-]+`)

// nsName turns a test name into a namespace name.
func nsName(t testing.TB, suffix string) string {
	n := strings.Trim(unsafeName.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	if suffix != "" {
		n += "-" + suffix
	}
	if len(n) > 63 {
		n = strings.Trim(n[len(n)-63:], "-")
	}
	return n
}
