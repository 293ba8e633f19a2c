package harness

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var resultsMu sync.Mutex

// WriteResult appends a scenario's figures to $CKS_E2E_RESULTS (JSON lines; default
// WorkDir/results.jsonl), for docs/BENCHMARKS.md.
func WriteResult(t testing.TB, name string, fields map[string]any) {
	t.Helper()
	path := os.Getenv("CKS_E2E_RESULTS")
	if path == "" {
		path = filepath.Join(WorkDir, "results.jsonl")
	}
	fields["scenario"] = name
	fields["at"] = time.Now().UTC().Format(time.RFC3339)
	b, _ := json.Marshal(fields)
	resultsMu.Lock()
	defer resultsMu.Unlock()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, _ = f.Write(append(b, '\n'))
}

// Percentile is the nearest-rank percentile p of sorted durations.
func Percentile(sorted []time.Duration, p int) time.Duration {
	idx := (p*len(sorted)+99)/100 - 1
	if idx < 0 {
		idx = 0
	}
	return sorted[idx]
}

// Ms is a duration in milliseconds.
func Ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// MsAll is every duration in milliseconds.
func MsAll(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = Ms(d)
	}
	return out
}
