package e2e

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ownRedis is a redis-server of this test alone, so that it can be stopped: SHUTDOWN SAVE keeps its
// data in dir, and a restart on the same port loads it again.
type ownRedis struct {
	port int
	dir  string
}

func startOwnRedis(t testing.TB, r *ownRedis) {
	t.Helper()
	if r.port == 0 {
		p, err := process.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		r.port, r.dir = p, t.TempDir()
	}
	out, err := exec.Command("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", strconv.Itoa(r.port),
		"--dir", r.dir, "--save", "", "--appendonly", "no", "--logfile", filepath.Join(r.dir, "redis.log")).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-server: %v: %s", err, out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if out, err := exec.Command("redis-cli", "-p", strconv.Itoa(r.port), "ping").Output(); err == nil && string(out) == "PONG\n" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("own redis-server on %d did not answer PING", r.port)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (r *ownRedis) stop(t testing.TB) {
	t.Helper()
	// Exits with an error status when the connection drops at shutdown: that is the success case.
	_ = exec.Command("redis-cli", "-p", strconv.Itoa(r.port), "shutdown", "save").Run()
	deadline := time.Now().Add(20 * time.Second)
	for exec.Command("redis-cli", "-p", strconv.Itoa(r.port), "ping").Run() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("own redis-server on %d did not stop", r.port)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// outageBroker is an exampleBroker on a server the test may take away and give back:
//   - redis: a redis-server of the test's own, shut down (SHUTDOWN SAVE) and started again on the
//     same port with its data;
//   - rabbitmq: the suite's RabbitMQ, `rabbitmqctl stop_app` (AMQP and the management API stop
//     answering) and `start_app` (durable queues and persistent messages come back);
//   - sqs: a moto server of the test's own, frozen (SIGSTOP: every request hangs until the
//     scaler's deadline) and thawed (SIGCONT): moto keeps its queues in memory only, so it is not
//     killed.
func outageBroker(t *testing.T, name, ns string) (b exampleBroker, stop, start func()) {
	t.Helper()
	switch name {
	case "redis":
		r := &ownRedis{}
		startOwnRedis(t, r)
		t.Cleanup(func() { r.stop(t) })
		b = newExampleBrokerAt(t, name, ns, fmt.Sprintf("redis://127.0.0.1:%d/0", r.port))
		return b, func() { r.stop(t) }, func() { startOwnRedis(t, r) }
	case "rabbitmq":
		b = newExampleBroker(t, name, ns)
		running := true
		start = func() {
			if out, err := exec.Command("rabbitmqctl", "start_app").CombinedOutput(); err != nil {
				t.Fatalf("rabbitmqctl start_app: %v: %s", err, out)
			}
			running = true
			deadline := time.Now().Add(60 * time.Second)
			for probeErr(b) != nil {
				if time.Now().After(deadline) {
					t.Fatalf("RabbitMQ did not answer within 60 s of start_app: %v", probeErr(b))
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
		t.Cleanup(func() {
			if !running {
				start()
			}
		})
		return b, func() {
			running = false
			if out, err := exec.Command("rabbitmqctl", "stop_app").CombinedOutput(); err != nil {
				t.Fatalf("rabbitmqctl stop_app: %v: %s", err, out)
			}
		}, start
	case "sqs":
		port, err := process.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(filepath.Join(filepath.Dir(python), "moto_server"), "-H", "127.0.0.1", "-p", strconv.Itoa(port))
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start moto_server (beside %s): %v", python, err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		b = newExampleBrokerAt(t, name, ns, fmt.Sprintf("http://127.0.0.1:%d", port))
		deadline := time.Now().Add(60 * time.Second)
		for {
			conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err == nil {
				conn.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("own moto_server on %d did not listen within 60 s", port)
			}
			time.Sleep(100 * time.Millisecond)
		}
		signal := func(sig syscall.Signal) func() {
			return func() {
				if err := cmd.Process.Signal(sig); err != nil {
					t.Fatalf("signal %v to moto_server: %v", sig, err)
				}
			}
		}
		t.Cleanup(signal(syscall.SIGCONT))
		return b, signal(syscall.SIGSTOP), signal(syscall.SIGCONT)
	}
	t.Fatalf("no broker %q", name)
	return
}

// probeErr is the error of one `probe` reading of the broker's example queues (nil: it answered).
func probeErr(b exampleBroker) error {
	_, err := probeDepth(b.broker, b.queues, b.probe...)
	return err
}

// TestBrokerOutage: on each broker, deploy/examples/<broker>/fallback.yaml (fallback 4 replicas
// after 3 failures) and the worker example's ScaledObject without fallback, on a broker that then
// goes away (outageBroker says how). KEDA applies the fallback to the first and holds the second's
// replicas (never 0), because the scaler answers GetMetricSpec without the broker and reports an
// error, not 0, for every reading. When the broker returns with its data, the computed replicas
// come back. pollingInterval is 5 s (the examples leave KEDA's 30 s default) so that three
// failures take 15 s.
func TestBrokerOutage(t *testing.T) {
	for _, name := range brokerNames {
		t.Run(name, func(t *testing.T) {
			ns := namespace(t, nsName(t, ""))
			b, stop, start := outageBroker(t, name, ns)
			testBrokerOutage(t, b, ns, stop, start)
		})
	}
}

func testBrokerOutage(t *testing.T, b exampleBroker, ns string, stopBroker, startBroker func()) {
	pub := b.publisher(t)
	secret, deployment, plain := b.workerExample(t)
	setTrigger(t, plain, "queues", "celery")
	plainDep := copyDeployment(t, deployment, "celery-worker-plain")
	plain.SetName("celery-worker-plain")
	set(t, plain, "celery-worker-plain", "spec", "scaleTargetRef", "name")
	fb := find(t, readExample(t, b.dir+"/fallback.yaml"), "ScaledObject")
	b.fix(t, fb)
	set(t, fb, int64(5), "spec", "pollingInterval")
	set(t, plain, int64(5), "spec", "pollingInterval")
	fallbackReplicas, _, _ := nestedInt(fb.Object, "spec", "fallback", "replicas")
	pub.publish(t, "celery", 25, 0) // queueLength 10 -> 3 replicas; creates the queue first
	apply(t, ns, secret, deployment, plainDep, fb, plain)
	waitScaledObjectReady(t, ns, fb.GetName(), 60*time.Second)
	waitScaledObjectReady(t, ns, plain.GetName(), 60*time.Second)
	withFallback, without := watchReplicas(t, ns, deployment.GetName()), watchReplicas(t, ns, plainDep.GetName())

	for name, rw := range map[string]*replicaWatch{fb.GetName(): withFallback, plain.GetName(): without} {
		if _, ok := rw.waitFor(3, 90*time.Second); !ok {
			t.Fatalf("%s: 25 tasks, queueLength 10: replicas %d, want 3; %v\n%s", name, rw.current().Replicas, rw.changes(), describe(ns, scaledObjectGVR, name))
		}
	}
	pub.cmd.Process.Kill() //nolint:errcheck // the publisher's connection would only retry during the outage

	stopBroker()
	down := time.Now()
	if _, ok := withFallback.waitFor(int32(fallbackReplicas), 120*time.Second); !ok {
		t.Fatalf("%s down: %s has %d replicas, want the fallback's %d; %v\n%s", b.name, fb.GetName(), withFallback.current().Replicas, fallbackReplicas, withFallback.changes(), describe(ns, scaledObjectGVR, fb.GetName()))
	}
	waitCondition(t, ns, fb.GetName(), "Fallback", "True")
	applied := time.Since(down)
	t.Logf("%s down at %s: fallback of %d replicas applied after %s", b.name, down.Format("15:04:05"), fallbackReplicas, applied.Round(time.Millisecond))
	// Hold the outage for three more polling intervals: the replicas of the trigger without
	// fallback never move.
	time.Sleep(15 * time.Second)
	if h := without.changes(); h[len(h)-1].Replicas != 3 || h[len(h)-1].At.After(down) {
		t.Fatalf("without fallback the replicas changed during the outage: %v", h)
	}
	events, _ := kube.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "reason=KEDAScalerFailed"})
	if len(events.Items) == 0 {
		t.Fatalf("no KEDAScalerFailed event during the outage\n%s", describe(ns, scaledObjectGVR, plain.GetName()))
	}
	t.Logf("KEDAScalerFailed event: %s", events.Items[0].Message)

	startBroker()
	if _, ok := withFallback.waitFor(3, 120*time.Second); !ok {
		t.Fatalf("%s back: %s has %d replicas, want the computed 3; %v\n%s", b.name, fb.GetName(), withFallback.current().Replicas, withFallback.changes(), describe(ns, scaledObjectGVR, fb.GetName()))
	}
	waitCondition(t, ns, fb.GetName(), "Fallback", "False")
	t.Logf("with fallback: %v; without: %v", withFallback.changes(), without.changes())
	writeResult(t, b.name+"_outage", map[string]any{"fallback_applied_s": applied.Seconds()})
}

func nestedInt(obj map[string]any, path ...string) (int64, bool, error) {
	var cur any = obj
	for _, p := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return 0, false, fmt.Errorf("no %v", path)
		}
		cur = m[p]
	}
	switch v := cur.(type) {
	case int64:
		return v, true, nil
	case float64:
		return int64(v), true, nil
	}
	return 0, false, fmt.Errorf("%v is %T", path, cur)
}

// waitCondition waits for a ScaledObject condition to have the given status (within 90 s).
func waitCondition(t testing.TB, ns, name, condition, status string) {
	t.Helper()
	waitConditionMessage(t, ns, name, condition, status, "", 90*time.Second)
}

// waitConditionMessage waits for a ScaledObject condition with the given status whose message
// contains want, and returns the message.
func waitConditionMessage(t testing.TB, ns, name, condition, status, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		u, err := kube.Dynamic.Resource(scaledObjectGVR).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			if c := cluster.FindCondition(u, condition); c != nil && c["status"] == status {
				if msg, _ := c["message"].(string); strings.Contains(msg, want) {
					return msg
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("ScaledObject %s/%s: no %s=%s mentioning %q within %s\n%s", ns, name, condition, status, want, timeout, describe(ns, scaledObjectGVR, name))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
