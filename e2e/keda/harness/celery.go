package harness

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Publisher is a long-lived tests/celery_app/publish_loop.py: publishing costs one round trip.
type Publisher struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

// NewPublisher starts a publisher on brokerURL with extra environment (cks_app settings such as
// CKS_QUEUE_NAME_PREFIX); it ends with the test.
func NewPublisher(t testing.TB, brokerURL string, env ...string) *Publisher {
	t.Helper()
	cmd := exec.Command(Python, filepath.Join(RepoRoot, "tests", "celery_app", "publish_loop.py"))
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
	p := &Publisher{cmd: cmd, in: in, out: bufio.NewScanner(out)}
	t.Cleanup(func() { in.Close(); _ = cmd.Wait() })
	if _, err := p.read(); err != nil {
		t.Fatalf("publish_loop.py did not start: %v", err)
	}
	return p
}

func (p *Publisher) read() (map[string]any, error) {
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

// Do sends one command to publish_loop.py and returns its answer.
func (p *Publisher) Do(t testing.TB, cmd map[string]any) map[string]any {
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

// Publish sends count `cks.sleep(seconds)` tasks to queue and returns when Celery has published them.
func (p *Publisher) Publish(t testing.TB, queue string, count int, seconds float64) {
	t.Helper()
	p.publish(t, count, map[string]any{"op": "publish", "queue": queue, "count": count, "seconds": seconds})
}

// PublishPriority sends count `cks.sleep(0)` tasks to queue with a Celery message priority (on
// Redis, kombu puts each priority step in a list of its own).
func (p *Publisher) PublishPriority(t testing.TB, queue string, count, priority int) {
	t.Helper()
	p.publish(t, count, map[string]any{"op": "publish", "queue": queue, "count": count, "seconds": 0, "priority": priority})
}

func (p *Publisher) publish(t testing.TB, count int, cmd map[string]any) {
	t.Helper()
	if got := p.Do(t, cmd); got["published"] != float64(count) {
		t.Fatalf("published %v tasks (%v), want %d", got["published"], cmd, count)
	}
}

// Purge empties queues.
func (p *Publisher) Purge(t testing.TB, queues ...string) {
	t.Helper()
	p.Do(t, map[string]any{"op": "purge", "queues": queues})
}

// Kill ends the publisher at once (its connection would only retry while a broker is away).
func (p *Publisher) Kill() { _ = p.cmd.Process.Kill() }

// WaitStarted waits until n tasks published with marker have started (cks.sleep counts them in
// the Redis database pub publishes to).
func (p *Publisher) WaitStarted(t testing.TB, marker string, n int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		got := int(p.Do(t, map[string]any{"op": "counter", "key": marker})["value"].(float64))
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d tasks started within 60s", got, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// StartWorker runs a real Celery worker (threads pool) on a Redis broker's queues until the test
// ends; tasks count their starts in the same database.
func StartWorker(t testing.TB, brokerURL string, queues []string, concurrency int) {
	t.Helper()
	StartWorkerEnv(t, brokerURL, queues, concurrency, "CKS_MARKER_REDIS="+brokerURL)
}

var workerSeq atomic.Int64

// StartWorkerEnv is StartWorker with extra environment (cks_app settings such as CKS_PREFETCH,
// CKS_MARKER_REDIS for a broker other than Redis).
func StartWorkerEnv(t testing.TB, brokerURL string, queues []string, concurrency int, env ...string) {
	t.Helper()
	n := workerSeq.Add(1)
	logPath := filepath.Join(WorkDir, "logs", fmt.Sprintf("%s-worker-%d.log", strings.ReplaceAll(t.Name(), "/", "_"), n))
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(Python, "-m", "celery", "-A", "cks_app", "worker", "-P", "threads",
		"-c", strconv.Itoa(concurrency), "-Q", strings.Join(queues, ","),
		"-n", fmt.Sprintf("e2e-%s-%d@localhost", RunID, n),
		"--without-mingle", "--without-gossip", "-l", "info")
	cmd.Dir = filepath.Join(RepoRoot, "tests", "celery_app")
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

// ProbeDepth runs the scaler's `probe` command (one reading with the default counters: ready, in
// flight and running) and returns the total over the queues.
func ProbeDepth(broker, queues string, extra ...string) (int, error) {
	args := append([]string{"probe", "brokerUrl=" + broker, "queues=" + queues}, extra...)
	out, err := exec.Command(os.Getenv("CKS_SCALER_BIN"), args...).CombinedOutput()
	if err != nil {
		return -1, fmt.Errorf("probe: %v: %s", err, out)
	}
	total, seen := 0, 0
	for _, line := range strings.Split(string(out), "\n") {
		if m := probeQueueLine.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			total += n
			seen++
		}
	}
	if seen == 0 {
		return -1, fmt.Errorf("probe printed no queue lines: %s", out)
	}
	return total, nil
}

var probeQueueLine = regexp.MustCompile(`^queue \S+: (\d+)$`)

// WaitDepthZero waits until the scaler reads 0 for the Redis worker example's queues (celery,
// priority), using the scaler's own probe command, and returns when it first did.
func WaitDepthZero(t testing.TB, broker string) time.Time {
	t.Helper()
	return WaitDepthZeroQueues(t, broker, "celery,priority")
}

// WaitDepthZeroQueues is WaitDepthZero for other queues and extra probe metadata.
func WaitDepthZeroQueues(t testing.TB, broker, queues string, extra ...string) time.Time {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		depth, err := ProbeDepth(broker, queues, extra...)
		if err == nil && depth == 0 {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the queues did not empty within 90s (depth %d, err %v)", depth, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
