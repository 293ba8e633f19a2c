package e2e

import (
	"os"
	"testing"

	"github.com/celery-keda-scaler/e2e/keda/harness"
)

// TestMain starts the control plane, KEDA and the suite's scaler once for every scenario
// (harness.Main), then runs them: the regular ones in parallel (t.Parallel), each in namespaces and
// places on the brokers of its own; the sequential ones (TestBrokerOutage, which stops brokers;
// TestPushNeverLost, which asserts latencies) first, alone.
func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }
