package e2e

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// outageBroker is a harness.ExampleBroker on a server the test may take away and give back:
//   - redis: a redis-server of the test's own, shut down (SHUTDOWN SAVE) and started again on the
//     same port with its data;
//   - rabbitmq: the suite's RabbitMQ, `rabbitmqctl stop_app` (AMQP and the management API stop
//     answering) and `start_app` (durable queues and persistent messages come back);
//   - sqs: a moto server of the test's own, frozen (SIGSTOP: every request hangs until the
//     scaler's deadline) and thawed (SIGCONT): moto keeps its queues in memory only, so it is not
//     killed.
func outageBroker(t *testing.T, name, ns string) (b harness.ExampleBroker, stop, start func()) {
	t.Helper()
	switch name {
	case "redis":
		r := &harness.OwnRedis{}
		r.Start(t)
		t.Cleanup(func() { r.Stop(t) })
		b = harness.NewExampleBrokerAt(t, name, ns, fmt.Sprintf("redis://127.0.0.1:%d/0", r.Port))
		return b, func() { r.Stop(t) }, func() { r.Start(t) }
	case "rabbitmq":
		b = harness.NewExampleBroker(t, name, ns)
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
		cmd := exec.Command(filepath.Join(filepath.Dir(harness.Python), "moto_server"), "-H", "127.0.0.1", "-p", strconv.Itoa(port))
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start moto_server (beside %s): %v", harness.Python, err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		b = harness.NewExampleBrokerAt(t, name, ns, fmt.Sprintf("http://127.0.0.1:%d", port))
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
func probeErr(b harness.ExampleBroker) error {
	_, err := harness.ProbeDepth(b.Broker, b.Queues, b.Probe...)
	return err
}

// TestBrokerOutage: on each broker, deploy/examples/<broker>/fallback.yaml (fallback 4 replicas
// after 3 failures) and the worker example's ScaledObject without fallback, on a broker that then
// goes away (outageBroker says how). KEDA applies the fallback to the first and holds the second's
// replicas (never 0), because the scaler answers GetMetricSpec without the broker and reports an
// error, not 0, for every reading. When the broker returns with its data, the computed replicas
// come back. pollingInterval is 5 s (the examples leave KEDA's 30 s default) so that three
// failures take 15 s.
//
// It runs sequentially (no t.Parallel): Go runs it, alone, before it releases the parallel
// scenarios. Its redis and sqs subtests, each on a server of its own, run in parallel with each
// other; the rabbitmq subtest stops the suite's shared RabbitMQ and runs first, alone (the test
// command runs it apart, with -run TestBrokerOutage/rabbitmq, after everything else).
func TestBrokerOutage(t *testing.T) {
	for _, name := range harness.BrokerNames {
		t.Run(name, func(t *testing.T) {
			if name != "rabbitmq" {
				t.Parallel()
			}
			ns := harness.Namespace(t, harness.NSName(t, ""))
			b, stop, start := outageBroker(t, name, ns)
			testBrokerOutage(t, b, ns, stop, start)
		})
	}
}

func testBrokerOutage(t *testing.T, b harness.ExampleBroker, ns string, stopBroker, startBroker func()) {
	pub := b.Publisher(t)
	secret, deployment, plain := b.WorkerExample(t)
	harness.SetTrigger(t, plain, "queues", "celery")
	plainDep := harness.CopyDeployment(t, deployment, "celery-worker-plain")
	plain.SetName("celery-worker-plain")
	harness.Set(t, plain, "celery-worker-plain", "spec", "scaleTargetRef", "name")
	fb := harness.Find(t, harness.ReadExample(t, b.Dir+"/fallback.yaml"), "ScaledObject")
	b.Fix(t, fb)
	harness.Set(t, fb, int64(5), "spec", "pollingInterval")
	harness.Set(t, plain, int64(5), "spec", "pollingInterval")
	fallbackReplicas, _, _ := harness.NestedInt(fb.Object, "spec", "fallback", "replicas")
	pub.Publish(t, "celery", 25, 0) // queueLength 10 -> 3 replicas; creates the queue first
	harness.Apply(t, ns, secret, deployment, plainDep, fb, plain)
	harness.WaitScaledObjectReady(t, ns, fb.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, plain.GetName(), 60*time.Second)
	withFallback, without := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, plainDep.GetName())

	for name, rw := range map[string]*harness.ReplicaWatch{fb.GetName(): withFallback, plain.GetName(): without} {
		if _, ok := rw.WaitFor(3, 90*time.Second); !ok {
			t.Fatalf("%s: 25 tasks, queueLength 10: replicas %d, want 3; %v\n%s", name, rw.Current().Replicas, rw.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, name))
		}
	}
	pub.Kill() //nolint:errcheck // the publisher's connection would only retry during the outage

	stopBroker()
	down := time.Now()
	if _, ok := withFallback.WaitFor(int32(fallbackReplicas), 120*time.Second); !ok {
		t.Fatalf("%s down: %s has %d replicas, want the fallback's %d; %v\n%s", b.Name, fb.GetName(), withFallback.Current().Replicas, fallbackReplicas, withFallback.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, fb.GetName()))
	}
	harness.WaitCondition(t, ns, fb.GetName(), "Fallback", "True")
	applied := time.Since(down)
	t.Logf("%s down at %s: fallback of %d replicas applied after %s", b.Name, down.Format("15:04:05"), fallbackReplicas, applied.Round(time.Millisecond))
	// Hold the outage for three more polling intervals: the replicas of the trigger without
	// fallback never move.
	time.Sleep(15 * time.Second)
	if h := without.Changes(); h[len(h)-1].Replicas != 3 || h[len(h)-1].At.After(down) {
		t.Fatalf("without fallback the replicas changed during the outage: %v", h)
	}
	events, _ := harness.Kube.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "reason=KEDAScalerFailed"})
	if len(events.Items) == 0 {
		t.Fatalf("no KEDAScalerFailed event during the outage\n%s", harness.Describe(ns, harness.ScaledObjectGVR, plain.GetName()))
	}
	t.Logf("KEDAScalerFailed event: %s", events.Items[0].Message)

	startBroker()
	if _, ok := withFallback.WaitFor(3, 120*time.Second); !ok {
		t.Fatalf("%s back: %s has %d replicas, want the computed 3; %v\n%s", b.Name, fb.GetName(), withFallback.Current().Replicas, withFallback.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, fb.GetName()))
	}
	harness.WaitCondition(t, ns, fb.GetName(), "Fallback", "False")
	t.Logf("with fallback: %v; without: %v", withFallback.Changes(), without.Changes())
	harness.WriteResult(t, b.Name+"_outage", map[string]any{"fallback_applied_s": applied.Seconds()})
}
