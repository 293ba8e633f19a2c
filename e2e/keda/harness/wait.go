package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
)

// Describe says what KEDA reported about a ScaledObject or ScaledJob: its conditions, the
// namespace's events, the HPA's status, the operator's log lines about it and the tail of the
// suite's scaler's log.
func Describe(ns string, gvr schema.GroupVersionResource, name string) string {
	ctx := context.Background()
	var b strings.Builder
	if u, err := Kube.Dynamic.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{}); err != nil {
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
	describeNamespace(&b, Kube.Client, ns)
	fmt.Fprintf(&b, "operator log lines about %s/%s:\n%s", ns, name, GrepLog(Kube.OperatorLog, ns, 25))
	fmt.Fprintf(&b, "%s\n", process.Tail(Scaler.Log, 15))
	return b.String()
}

// describeNamespace writes a namespace's events, oldest first, and the status of its HPAs.
func describeNamespace(b *strings.Builder, client kubernetes.Interface, ns string) {
	ctx := context.Background()
	if evs, err := client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{}); err == nil {
		sort.Slice(evs.Items, func(i, j int) bool { return evs.Items[i].LastTimestamp.Before(&evs.Items[j].LastTimestamp) })
		fmt.Fprintf(b, "events in %s:\n", ns)
		for _, e := range evs.Items {
			fmt.Fprintf(b, "  %s %s %s/%s: %s (x%d)\n", e.Type, e.Reason, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Message, e.Count)
		}
	}
	if hpas, err := client.AutoscalingV2().HorizontalPodAutoscalers(ns).List(ctx, metav1.ListOptions{}); err == nil {
		for _, h := range hpas.Items {
			st, _ := json.Marshal(h.Status)
			fmt.Fprintf(b, "hpa %s status: %s\n", h.Name, st)
		}
	}
}

// GrepLog returns the last n lines of a log file that contain needle (each cut at 400 bytes).
func GrepLog(path, needle string, n int) string {
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

// WaitScaledObjectReady waits until a ScaledObject is Ready and KEDA has written its metric names
// (before that KEDA drops pushes) and its HPA exists.
func WaitScaledObjectReady(t testing.TB, ns, name string, timeout time.Duration) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	for {
		u, err := Kube.Dynamic.Resource(ScaledObjectGVR).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			cond := cluster.FindCondition(u, "Ready")
			names, _, _ := unstructured.NestedStringSlice(u.Object, "status", "externalMetricNames")
			_, hpaErr := Kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(ctx, "keda-hpa-"+name, metav1.GetOptions{})
			if cond != nil && cond["status"] == "True" && len(names) > 0 && hpaErr == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("ScaledObject %s/%s not Ready with metric names and an HPA within %s\n%s", ns, name, timeout, Describe(ns, ScaledObjectGVR, name))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// WaitHPAMetric waits until the HPA KEDA made reports the external metric (read from the scaler
// through KEDA's metrics apiserver) as want per replica.
func WaitHPAMetric(t testing.TB, ns, name string, want int64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		h, err := Kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			for _, m := range h.Status.CurrentMetrics {
				if m.External != nil && m.External.Current.AverageValue != nil && m.External.Current.AverageValue.Value() == want {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			st := ""
			if h != nil {
				b, _ := json.Marshal(h.Status)
				st = string(b)
			}
			t.Fatalf("HPA %s/%s does not report the external metric at %d per replica within 60s (err %v): %s", ns, name, want, err, st)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// WaitCondition waits for a ScaledObject condition to have the given status (within 90 s).
func WaitCondition(t testing.TB, ns, name, condition, status string) {
	t.Helper()
	WaitConditionMessage(t, ns, name, condition, status, "", 90*time.Second)
}

// WaitConditionMessage waits for a ScaledObject condition with the given status whose message
// contains want, and returns the message.
func WaitConditionMessage(t testing.TB, ns, name, condition, status, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		u, err := Kube.Dynamic.Resource(ScaledObjectGVR).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			if c := cluster.FindCondition(u, condition); c != nil && c["status"] == status {
				if msg, _ := c["message"].(string); strings.Contains(msg, want) {
					return msg
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("ScaledObject %s/%s: no %s=%s mentioning %q within %s\n%s", ns, name, condition, status, want, timeout, Describe(ns, ScaledObjectGVR, name))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// WaitNotReady waits for KEDA to mark a ScaledObject Ready=False with a message containing want.
func WaitNotReady(t testing.TB, ns, name, want string) string {
	t.Helper()
	return WaitConditionMessage(t, ns, name, "Ready", "False", want, 60*time.Second)
}

// WaitEvent waits for an event with the reason whose message contains substr, and returns it.
func WaitEvent(t testing.TB, ns, reason, substr string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		evs, err := Kube.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "reason=" + reason})
		if err == nil {
			for _, e := range evs.Items {
				if strings.Contains(e.Message, substr) {
					return e.Message
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event containing %q in %s within %s", reason, substr, ns, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// WaitLogLine waits for a line of a log file that contains both strings, and returns it.
func WaitLogLine(t testing.TB, path, a, b string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, line := range strings.Split(ReadFile(t, path), "\n") {
			if strings.Contains(line, a) && strings.Contains(line, b) {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line with %q and %q in %s within %s\n%s", a, b, path, timeout, process.Tail(path, 10))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// CountJobs counts the Jobs a ScaledJob created.
func CountJobs(ns, scaledJob string) (int, error) {
	jobs, err := Kube.Client.BatchV1().Jobs(ns).List(context.Background(), metav1.ListOptions{LabelSelector: "scaledjob.keda.sh/name=" + scaledJob})
	if err != nil {
		return 0, err
	}
	return len(jobs.Items), nil
}

// WaitJobs waits until a ScaledJob has created exactly want Jobs (more fails at once).
func WaitJobs(t testing.TB, ns, scaledJob string, want int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		n, err := CountJobs(ns, scaledJob)
		if err == nil && n == want {
			return
		}
		if err == nil && n > want {
			t.Fatalf("ScaledJob %s/%s created %d Jobs, want %d", ns, scaledJob, n, want)
		}
		if time.Now().After(deadline) {
			t.Fatalf("ScaledJob %s/%s: %d Jobs after %s, want %d (err %v)\n%s", ns, scaledJob, n, timeout, want, err, Describe(ns, ScaledJobGVR, scaledJob))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// HoldJobs checks the Job count stays exactly want for the whole period.
func HoldJobs(t testing.TB, ns, scaledJob string, want int, period time.Duration) {
	t.Helper()
	end := time.Now().Add(period)
	for time.Now().Before(end) {
		n, err := CountJobs(ns, scaledJob)
		if err != nil {
			t.Fatal(err)
		}
		if n != want {
			t.Fatalf("ScaledJob %s/%s has %d Jobs, want exactly %d for %s", ns, scaledJob, n, want, period)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
