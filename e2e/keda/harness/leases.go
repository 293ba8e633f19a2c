package harness

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Each test's place on the shared brokers. Redis: a database leased from the pool
// CKS_E2E_REDIS_DBS (default 1-15; database 0 belongs to the Rust suites), exclusively, through a
// lock file per database in /tmp held with flock(2): another test of this run, or of another run
// on the same machine and Redis, waits for it. The database is flushed when leased and when
// released. RabbitMQ: a vhost named after the test and the run. SQS: a queue-name prefix of the
// test and the run.

// RedisDB is a database of the suite's Redis leased by one test.
type RedisDB struct {
	// Index is the database number.
	Index int
	// URL is the Celery broker URL of the database.
	URL string
}

// redisDBPool parses CKS_E2E_REDIS_DBS: numbers and ranges, comma-separated ("1-15", "3,5-7").
func redisDBPool() ([]int, error) {
	spec := os.Getenv("CKS_E2E_REDIS_DBS")
	if spec == "" {
		spec = "1-15"
	}
	var pool []int
	seen := map[int]bool{}
	for _, part := range strings.Split(spec, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		a, errA := strconv.Atoi(lo)
		b := a
		var errB error
		if isRange {
			b, errB = strconv.Atoi(hi)
		}
		if errA != nil || errB != nil || a > b || a < 0 {
			return nil, fmt.Errorf("CKS_E2E_REDIS_DBS=%q: want database numbers and ranges such as 1-15 or 3,5-7", spec)
		}
		for i := a; i <= b; i++ {
			if i == 0 {
				return nil, fmt.Errorf("CKS_E2E_REDIS_DBS=%q: database 0 belongs to the Rust suites", spec)
			}
			if !seen[i] {
				seen[i] = true
				pool = append(pool, i)
			}
		}
	}
	return pool, nil
}

var unsafeFileChars = regexp.MustCompile(`[^A-Za-z0-9]+`)

// LeaseRedisDB leases a database of the suite's Redis for the test (waiting while every database
// of the pool is leased), flushed, and flushes and releases it when the test ends: its cleanup is
// registered first, so it runs after those of the workers, publishers and ScaledObjects that use it.
func LeaseRedisDB(t testing.TB) RedisDB {
	t.Helper()
	pool, err := redisDBPool()
	if err != nil {
		t.Fatal(err)
	}
	server := unsafeFileChars.ReplaceAllString(strings.TrimPrefix(RedisURL, "redis://"), "-")
	start, lastNote := time.Now(), time.Now()
	for {
		for _, db := range pool {
			lock := filepath.Join("/tmp", fmt.Sprintf("cks-e2e-redis-%s-db%d.lock", server, db))
			f, err := os.OpenFile(lock, os.O_CREATE|os.O_RDWR, 0o666)
			if err != nil {
				t.Fatalf("Redis database lease: %v", err)
			}
			if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
				f.Close()
				continue
			}
			d := RedisDB{Index: db, URL: fmt.Sprintf("%s/%d", RedisURL, db)}
			if err := flushRedisDB(d); err != nil {
				f.Close()
				t.Fatalf("flush Redis database %d at lease: %v", db, err)
			}
			t.Cleanup(func() {
				if err := flushRedisDB(d); err != nil {
					t.Errorf("flush Redis database %d at release: %v", db, err)
				}
				_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			})
			return d
		}
		if time.Since(start) > 20*time.Minute {
			t.Fatalf("no Redis database of CKS_E2E_REDIS_DBS=%v free for 20 min (lock files /tmp/cks-e2e-redis-%s-db*.lock)", pool, server)
		}
		if time.Since(lastNote) > 30*time.Second {
			Logf("%s waits for a Redis database of %v (all leased)", t.Name(), pool)
			lastNote = time.Now()
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// flushRedisDB runs FLUSHDB on the database (AUTH first when the URL carries a password).
func flushRedisDB(d RedisDB) error {
	u, err := url.Parse(RedisURL)
	if err != nil {
		return err
	}
	conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	cmd := func(args ...string) error {
		var b strings.Builder
		fmt.Fprintf(&b, "*%d\r\n", len(args))
		for _, a := range args {
			fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
		}
		if _, err := conn.Write([]byte(b.String())); err != nil {
			return err
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if !strings.HasPrefix(line, "+") {
			return fmt.Errorf("%s: %s", args[0], strings.TrimSpace(line))
		}
		return nil
	}
	if pw, ok := u.User.Password(); ok {
		args := []string{"AUTH", pw}
		if name := u.User.Username(); name != "" {
			args = []string{"AUTH", name, pw}
		}
		if err := cmd(args...); err != nil {
			return err
		}
	}
	if err := cmd("SELECT", strconv.Itoa(d.Index)); err != nil {
		return err
	}
	return cmd("FLUSHDB")
}

// RabbitVhost creates a vhost of this test and run on the suite's RabbitMQ (guest may use it),
// deleted when the test ends, and returns its AMQP URL and the management API's base URL.
func RabbitVhost(t testing.TB, name string) (amqpURL, managementURL string) {
	t.Helper()
	mgmt := strings.TrimRight(os.Getenv("CKS_RABBITMQ_MANAGEMENT_URL"), "/")
	base := strings.TrimRight(os.Getenv("CKS_AMQP_URL"), "/")
	if mgmt == "" || base == "" {
		t.Fatal("CKS_RABBITMQ_MANAGEMENT_URL and CKS_AMQP_URL must be set (scripts/test.sh sets them)")
	}
	vhost := name + "-" + RunID
	do := func(method, path, body string) {
		req, _ := http.NewRequest(method, mgmt+path, strings.NewReader(body))
		req.SetBasicAuth("guest", "guest")
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("RabbitMQ management %s %s: %v", method, path, err)
		}
		resp.Body.Close()
		if resp.StatusCode >= 300 {
			t.Fatalf("RabbitMQ management %s %s: HTTP %d", method, path, resp.StatusCode)
		}
	}
	do("PUT", "/api/vhosts/"+vhost, "")
	do("PUT", "/api/permissions/"+vhost+"/guest", `{"configure":".*","write":".*","read":".*"}`)
	t.Cleanup(func() { do("DELETE", "/api/vhosts/"+vhost, "") })
	// CKS_AMQP_URL ends in the default vhost ("//"): replace it.
	return strings.TrimSuffix(base, "/") + "/" + vhost, mgmt
}

// SQS is the moto server scripts/test.sh starts (CKS_SQS_ENDPOINT) or one of the test's own, the
// Celery broker URL that reaches it with moto's test keys, and a queue-name prefix of the test and
// the run, so that no two tests (of this run or another) share an SQS queue.
type SQS struct {
	Endpoint, Broker, Prefix string
}

var sqsSeq atomic.Int64

// NewSQS is the suite's moto (endpoint "") or a moto server of the test's own, with a new prefix.
func NewSQS(t testing.TB, endpoint string) SQS {
	t.Helper()
	if endpoint == "" {
		endpoint = os.Getenv("CKS_SQS_ENDPOINT")
	}
	if endpoint == "" {
		t.Fatal("CKS_SQS_ENDPOINT must be set (scripts/test.sh starts moto and sets it)")
	}
	endpoint = strings.TrimRight(endpoint, "/")
	return SQS{
		Endpoint: endpoint,
		Broker:   "sqs://testing:testing@" + strings.TrimPrefix(endpoint, "http://"),
		Prefix:   fmt.Sprintf("e2e-%s-%d-", RunID, sqsSeq.Add(1)),
	}
}

// Env is what cks_app needs to use the prefix (publisher and workers).
func (s SQS) Env() string { return "CKS_QUEUE_NAME_PREFIX=" + s.Prefix }

// QueueURL is the SQS queue URL of a Celery queue, as moto names it (kombu replaces `.` by `-`).
func (s SQS) QueueURL(celeryQueue string) string {
	return s.Endpoint + "/123456789012/" + s.Prefix + strings.ReplaceAll(celeryQueue, ".", "-")
}

// ProbeArgs are the trigger keys besides brokerUrl and queues for `probe`.
func (s SQS) ProbeArgs() []string {
	return []string{"queueNamePrefix=" + s.Prefix, "awsRegion=us-east-1"}
}
