package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
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
		p, err := cluster.FreePort()
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

// TestRedisBrokerOutage: deploy/examples/redis/fallback.yaml (fallback 4 replicas after 3 failures)
// and the worker example's ScaledObject without fallback, on a Redis that is then shut down. KEDA
// applies the fallback to the first and holds the second's replicas (never 0), because the scaler
// answers GetMetricSpec without the broker and reports an error, not 0, for every reading. When
// Redis returns with its data, the computed replicas come back. pollingInterval is 5 s (the
// examples leave KEDA's 30 s default) so that three failures take 15 s.
func TestRedisBrokerOutage(t *testing.T) {
	r := &ownRedis{}
	startOwnRedis(t, r)
	t.Cleanup(func() { r.stop(t) })
	broker := fmt.Sprintf("redis://127.0.0.1:%d/0", r.port)
	pub := newPublisher(t, broker)
	ns := namespace(t, nsName(t, ""))

	secret, deployment, plain := exampleWorker(t)
	set(t, secret, broker, "stringData", "url")
	setTrigger(t, plain, "queues", "celery")
	plainDep := copyDeployment(t, deployment, "celery-worker-plain")
	plain.SetName("celery-worker-plain")
	set(t, plain, "celery-worker-plain", "spec", "scaleTargetRef", "name")
	fb := find(t, readExample(t, "deploy/examples/redis/fallback.yaml"), "ScaledObject")
	setTrigger(t, fb, "scalerAddress", scaler.Addr)
	set(t, fb, int64(5), "spec", "pollingInterval")
	set(t, plain, int64(5), "spec", "pollingInterval")
	fallbackReplicas, _, _ := nestedInt(fb.Object, "spec", "fallback", "replicas")
	apply(t, ns, secret, deployment, plainDep, fb, plain)
	waitScaledObjectReady(t, ns, fb.GetName(), 60*time.Second)
	waitScaledObjectReady(t, ns, plain.GetName(), 60*time.Second)
	withFallback, without := watchReplicas(t, ns, deployment.GetName()), watchReplicas(t, ns, plainDep.GetName())

	pub.publish(t, "celery", 25, 0) // queueLength 10 -> 3 replicas
	for name, rw := range map[string]*replicaWatch{fb.GetName(): withFallback, plain.GetName(): without} {
		if _, ok := rw.waitFor(3, 90*time.Second); !ok {
			t.Fatalf("%s: 25 tasks, queueLength 10: replicas %d, want 3; %v\n%s", name, rw.current().Replicas, rw.changes(), describe(ns, scaledObjectGVR, name))
		}
	}
	pub.cmd.Process.Kill() //nolint:errcheck // the publisher's connection would only retry during the outage

	r.stop(t)
	down := time.Now()
	if _, ok := withFallback.waitFor(int32(fallbackReplicas), 120*time.Second); !ok {
		t.Fatalf("Redis down: %s has %d replicas, want the fallback's %d; %v\n%s", fb.GetName(), withFallback.current().Replicas, fallbackReplicas, withFallback.changes(), describe(ns, scaledObjectGVR, fb.GetName()))
	}
	waitCondition(t, ns, fb.GetName(), "Fallback", "True")
	t.Logf("Redis down at %s: fallback of %d replicas applied after %s", down.Format("15:04:05"), fallbackReplicas, time.Since(down).Round(time.Millisecond))
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

	startOwnRedis(t, r)
	if _, ok := withFallback.waitFor(3, 120*time.Second); !ok {
		t.Fatalf("Redis back: %s has %d replicas, want the computed 3; %v\n%s", fb.GetName(), withFallback.current().Replicas, withFallback.changes(), describe(ns, scaledObjectGVR, fb.GetName()))
	}
	waitCondition(t, ns, fb.GetName(), "Fallback", "False")
	t.Logf("with fallback: %v; without: %v", withFallback.changes(), without.changes())
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
