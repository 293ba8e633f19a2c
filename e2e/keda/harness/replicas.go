package harness

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
)

// ReplicaWatch follows a Deployment's spec.replicas through a watch, recording when each value was
// first seen by this process.
type ReplicaWatch struct {
	mu      sync.Mutex
	history []ReplicaChange
	notify  chan struct{}
	stop    func()
}

// ReplicaChange is one value of spec.replicas and when it was first seen.
type ReplicaChange struct {
	At       time.Time
	Replicas int32
}

func (c ReplicaChange) String() string {
	return fmt.Sprintf("%d at %s", c.Replicas, c.At.Format("15:04:05.000"))
}

// WatchReplicas starts watching a Deployment's spec.replicas until the test ends (or Stop).
func WatchReplicas(t testing.TB, ns, name string) *ReplicaWatch {
	t.Helper()
	return WatchReplicasOn(t, Kube, ns, name)
}

// WatchReplicasOn is WatchReplicas on another control plane (a test's own).
func WatchReplicasOn(t testing.TB, kube *cluster.Cluster, ns, name string) *ReplicaWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	rw := &ReplicaWatch{notify: make(chan struct{}, 1), stop: cancel}
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

func (rw *ReplicaWatch) record(r *int32) {
	v := int32(1)
	if r != nil {
		v = *r
	}
	rw.mu.Lock()
	if n := len(rw.history); n == 0 || rw.history[n-1].Replicas != v {
		rw.history = append(rw.history, ReplicaChange{At: time.Now(), Replicas: v})
	}
	rw.mu.Unlock()
	select {
	case rw.notify <- struct{}{}:
	default:
	}
}

// Stop ends the watch before the test does.
func (rw *ReplicaWatch) Stop() { rw.stop() }

// Current is the latest value seen.
func (rw *ReplicaWatch) Current() ReplicaChange {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.history[len(rw.history)-1]
}

// Changes is every value seen, in order.
func (rw *ReplicaWatch) Changes() []ReplicaChange {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return append([]ReplicaChange(nil), rw.history...)
}

// WaitFor returns when spec.replicas == want, with the time it was first seen.
func (rw *ReplicaWatch) WaitFor(want int32, timeout time.Duration) (time.Time, bool) {
	deadline := time.After(timeout)
	for {
		if c := rw.Current(); c.Replicas == want {
			return c.At, true
		}
		select {
		case <-rw.notify:
		case <-deadline:
			return time.Time{}, false
		}
	}
}

// HoldReplicas checks spec.replicas stays want for the whole period.
func HoldReplicas(t testing.TB, rw *ReplicaWatch, want int32, period time.Duration) {
	t.Helper()
	start := time.Now()
	time.Sleep(period)
	for _, c := range rw.Changes() {
		if c.At.After(start) || rw.Current().Replicas != want {
			t.Fatalf("replicas changed within %s: %v (want %d throughout)", period, rw.Changes(), want)
		}
	}
}
