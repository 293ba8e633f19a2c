package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// What a plain HPA reads, read the same way: the external metrics API of a control plane (through
// the aggregator), Prometheus' answer to a query, and what the HPA reports.

// ExternalMetric returns the values the external metrics API answers for a metric in a namespace
// with a label selector (as an HPA's External metric asks for it), in order: none at all when the
// server has no value, which an HPA treats as an error.
func ExternalMetric(kube *cluster.Cluster, ns, metric, selector string) ([]resource.Quantity, error) {
	path := fmt.Sprintf("/apis/external.metrics.k8s.io/v1beta1/namespaces/%s/%s", ns, metric)
	body, err := kube.Client.Discovery().RESTClient().Get().AbsPath(path).Param("labelSelector", selector).DoRaw(context.Background())
	if err != nil {
		return nil, fmt.Errorf("GET %s?labelSelector=%s: %v: %s", path, selector, err, body)
	}
	var list struct {
		Kind  string `json:"kind"`
		Items []struct {
			Value resource.Quantity `json:"value"`
		} `json:"items"`
	}
	if err := json.Unmarshal(body, &list); err != nil || list.Kind != "ExternalMetricValueList" {
		return nil, fmt.Errorf("GET %s: not an ExternalMetricValueList (%v): %s", path, err, body)
	}
	var out []resource.Quantity
	for _, it := range list.Items {
		out = append(out, it.Value)
	}
	return out, nil
}

// WaitExternalMetric waits until the external metrics API answers exactly one value, want.
func WaitExternalMetric(t testing.TB, kube *cluster.Cluster, ns, metric, selector string, want int64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, err := ExternalMetric(kube, ns, metric, selector)
		if err == nil && len(got) == 1 && got[0].MilliValue() == want*1000 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("external metric %s{%s} in %s: %v (err %v), want exactly [%d] within %s\n%s", metric, selector, ns, got, err, want, timeout, DescribeWithoutKeda(kube, ns))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// PromQuery returns the samples of an instant query to Prometheus, by their labels.
func PromQuery(promURL, query string) (map[string]string, error) {
	body, err := process.HTTPGet(&http.Client{Timeout: 5 * time.Second}, promURL+"/api/v1/query?query="+url.QueryEscape(query))
	if err != nil {
		return nil, err
	}
	var answer struct {
		Status string `json:"status"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &answer); err != nil || answer.Status != "success" {
		return nil, fmt.Errorf("query %s: %v: %s", query, err, body)
	}
	out := map[string]string{}
	for _, r := range answer.Data.Result {
		var labels []string
		for k, v := range r.Metric {
			labels = append(labels, k+"="+v)
		}
		sort.Strings(labels)
		out[strings.Join(labels, ",")] = fmt.Sprint(r.Value[1])
	}
	return out, nil
}

// WaitPromQuery waits until an instant query to Prometheus answers exactly want (labels, as
// PromQuery prints them, -> value).
func WaitPromQuery(t testing.TB, promURL, query string, want map[string]string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := PromQuery(promURL, query)
		// fmt prints maps in key order.
		if err == nil && fmt.Sprint(got) == fmt.Sprint(want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus answers %s with %v (err %v), want %v within 30s", query, got, err, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// WaitHPAExternalAverage waits until an HPA reports its External metric's current averageValue as
// want (a quantity, such as "4700m").
func WaitHPAExternalAverage(t testing.TB, kube *cluster.Cluster, ns, name, want string, timeout time.Duration) {
	t.Helper()
	wantQ := resource.MustParse(want)
	deadline := time.Now().Add(timeout)
	for {
		h, err := kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			for _, m := range h.Status.CurrentMetrics {
				if m.External != nil && m.External.Current.AverageValue != nil && m.External.Current.AverageValue.Cmp(wantQ) == 0 {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("HPA %s/%s does not report the external metric at %s per replica within %s (err %v)\n%s", ns, name, want, timeout, err, DescribeWithoutKeda(kube, ns))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// DescribeWithoutKeda says what happened in a namespace of a control plane without KEDA: its
// events, its HPAs' status (conditions included), and the tails of Prometheus Adapter's and
// Prometheus' logs.
func DescribeWithoutKeda(kube *cluster.Cluster, ns string) string {
	var b strings.Builder
	describeNamespace(&b, kube.Client, ns)
	fmt.Fprintf(&b, "%s\n%s\n", process.Tail(kube.PrometheusAdapterLog, 15), process.Tail(kube.PrometheusLog, 5))
	return b.String()
}
