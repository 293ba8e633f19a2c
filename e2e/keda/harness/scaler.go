package harness

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
)

// ScalerProcess is a running `celery-keda-scaler serve` (the binary in CKS_SCALER_BIN).
type ScalerProcess struct {
	// Addr is host:port of the gRPC listener, as triggers name it in scalerAddress.
	Addr string
	// Admin is host:port of the admin listener (/readyz, /metrics).
	Admin string
	// Log is the process's log file.
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
	once sync.Once
}

// StartScaler runs `celery-keda-scaler serve` on free loopback ports, with extra arguments and
// environment, its log in WorkDir/logs/<name>.log, and waits for /readyz.
func StartScaler(name string, extraArgs []string, env ...string) (*ScalerProcess, error) {
	bin := os.Getenv("CKS_SCALER_BIN")
	grpcPort, err := process.FreePort()
	if err != nil {
		return nil, err
	}
	adminPort, err := process.FreePort()
	if err != nil {
		return nil, err
	}
	s := &ScalerProcess{
		Addr:  fmt.Sprintf("127.0.0.1:%d", grpcPort),
		Admin: fmt.Sprintf("127.0.0.1:%d", adminPort),
		Log:   filepath.Join(WorkDir, "logs", name+".log"),
		done:  make(chan struct{}),
	}
	f, err := os.Create(s.Log)
	if err != nil {
		return nil, err
	}
	args := append([]string{"serve", "--listen", s.Addr, "--admin-listen", s.Admin}, extraArgs...)
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
		if resp, err := http.Get("http://" + s.Admin + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				Logf("Scaler %s serving on %s (admin %s)", name, s.Addr, s.Admin)
				return s, nil
			}
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("the scaler exited at start-up\n%s", process.Tail(s.Log, 20))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("the scaler was not ready within 30s\n%s", process.Tail(s.Log, 20))
		}
	}
}

// OwnScaler is StartScaler for one test: a scaler process whose metrics and streams no other test
// touches, stopped when the test ends.
func OwnScaler(t testing.TB, name string, extraArgs []string, env ...string) *ScalerProcess {
	t.Helper()
	s, err := StartScaler(name, extraArgs, env...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Stop ends the process (SIGTERM, then SIGKILL after 15 s); calling it again does nothing.
func (s *ScalerProcess) Stop() {
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

// Pid is the process id.
func (s *ScalerProcess) Pid() int { return s.cmd.Process.Pid }

// Gauge reads one unlabelled series from the scaler's /metrics.
func (s *ScalerProcess) Gauge(name string) (float64, error) { return s.Counter(name) }

// Counter reads one series, named with its labels exactly as /metrics prints them.
func (s *ScalerProcess) Counter(name string) (float64, error) {
	resp, err := http.Get("http://" + s.Admin + "/metrics")
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

// WaitStreams waits until the scaler has exactly n open StreamIsActive streams (a gauge of the
// whole process: meaningful on a scaler of the test's own).
func (s *ScalerProcess) WaitStreams(t testing.TB, n float64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, err := s.Gauge("celery_keda_streams")
		if err == nil && got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the scaler has %v open push streams (err %v), want %v within %s", got, err, n, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Samples reads every series of a metric from the scaler's /metrics whose labels include match
// (label name -> value), keyed by the series' label text as printed.
func (s *ScalerProcess) Samples(name string, match map[string]string) (map[string]float64, error) {
	body, err := process.HTTPGet(&http.Client{Timeout: 5 * time.Second}, "http://"+s.Admin+"/metrics")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		rest, ok := strings.CutPrefix(line, name+"{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			return nil, fmt.Errorf("unexpected line in /metrics: %q", line)
		}
		matched := 0
		for _, pair := range strings.Split(labels, ",") {
			k, v, _ := strings.Cut(pair, "=")
			if want, ok := match[k]; ok && strconv.Quote(want) == v {
				matched++
			}
		}
		if matched < len(match) {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return nil, fmt.Errorf("line %q: %w", line, err)
		}
		out[labels] = f
	}
	return out, nil
}

// WaitSum waits until the series of a metric whose labels include match add up to exactly want in
// the scaler's /metrics (at least one series).
func (s *ScalerProcess) WaitSum(t testing.TB, name string, match map[string]string, want float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := s.Samples(name, match)
		sum := 0.0
		for _, v := range got {
			sum += v
		}
		if err == nil && len(got) > 0 && sum == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("scaler %s: %s%v is %v (sum %v, err %v), want %v within 30s\n%s", s.Admin, name, match, got, sum, err, want, process.Tail(s.Log, 10))
		}
		time.Sleep(200 * time.Millisecond)
	}
}
