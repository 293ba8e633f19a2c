package harness

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
)

// AMQPCounter is a TCP proxy in front of a RabbitMQ node's AMQP port that counts the AMQP 0-9-1
// methods its clients send (by class and method: `queue.declare`, `basic.get`, ...), so a
// benchmark can tell what a scaler asks of the broker: passive declares leave no trace in
// RabbitMQ's own statistics. Heartbeats and content frames are not methods and are not counted.
type AMQPCounter struct {
	Addr     string // host:port clients connect to
	listener net.Listener
	mu       sync.Mutex
	methods  map[string]int64
	conns    atomic.Int64
}

// amqpMethods names the methods a scaler sends; others are shown as class.method numbers.
var amqpMethods = map[[2]uint16]string{
	{10, 11}: "connection.start-ok", {10, 31}: "connection.tune-ok", {10, 40}: "connection.open",
	{10, 50}: "connection.close", {10, 51}: "connection.close-ok",
	{20, 10}: "channel.open", {20, 40}: "channel.close", {20, 41}: "channel.close-ok", {40, 10}: "exchange.declare",
	{50, 10}: "queue.declare", {60, 70}: "basic.get", {60, 10}: "basic.qos", {60, 20}: "basic.consume",
	{60, 40}: "basic.publish", {60, 80}: "basic.ack",
}

// StartAMQPCounter listens on a free loopback port and forwards every connection to target.
func StartAMQPCounter(t testing.TB, target string) *AMQPCounter {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &AMQPCounter{Addr: l.Addr().String(), listener: l, methods: map[string]int64{}}
	go func() {
		for {
			client, err := l.Accept()
			if err != nil {
				return
			}
			c.conns.Add(1)
			go c.relay(client, target)
		}
	}()
	t.Cleanup(func() { _ = l.Close() })
	return c
}

func (c *AMQPCounter) relay(client net.Conn, target string) {
	defer client.Close()
	server, err := net.Dial("tcp", target)
	if err != nil {
		return
	}
	defer server.Close()
	go func() {
		_, _ = io.Copy(client, server)
		_ = client.Close()
	}()
	// Client to server: the protocol header, then frames (type, channel, size, payload, end).
	r := io.TeeReader(client, server)
	header := make([]byte, 8)
	if _, err := io.ReadFull(r, header); err != nil {
		return
	}
	frame := make([]byte, 7)
	for {
		if _, err := io.ReadFull(r, frame); err != nil {
			return
		}
		size := binary.BigEndian.Uint32(frame[3:7])
		payload := make([]byte, int(size)+1) // + frame-end
		if _, err := io.ReadFull(r, payload); err != nil {
			return
		}
		if frame[0] == 1 && size >= 4 { // a method frame
			id := [2]uint16{binary.BigEndian.Uint16(payload[0:2]), binary.BigEndian.Uint16(payload[2:4])}
			name, ok := amqpMethods[id]
			if !ok {
				name = fmt.Sprintf("%d.%d", id[0], id[1])
			}
			c.mu.Lock()
			c.methods[name]++
			c.mu.Unlock()
		}
	}
}

// Methods returns a copy of the counts so far, by method name.
func (c *AMQPCounter) Methods() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int64, len(c.methods))
	for k, v := range c.methods {
		out[k] = v
	}
	return out
}

// Connections is the number of client connections accepted so far.
func (c *AMQPCounter) Connections() int64 { return c.conns.Load() }

// HTTPCounter is a reverse proxy in front of RabbitMQ's management API that counts requests.
type HTTPCounter struct {
	URL      string // base URL clients use (no credentials)
	requests atomic.Int64
}

// StartHTTPCounter serves a counting reverse proxy to target (a base URL) on a free loopback port.
func StartHTTPCounter(t testing.TB, target string) *HTTPCounter {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &HTTPCounter{URL: "http://" + l.Addr().String()}
	proxy := httputil.NewSingleHostReverseProxy(u)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.requests.Add(1)
		proxy.ServeHTTP(w, r)
	})}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			Logf("management counter: %v", err)
		}
	}()
	t.Cleanup(func() { _ = srv.Close() })
	return c
}

// Requests is the number of requests proxied so far.
func (c *HTTPCounter) Requests() int64 { return c.requests.Load() }

// MethodDelta is after - before per method, the methods sorted by name; zero counts left out.
func MethodDelta(before, after map[string]int64) []string {
	var out []string
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			out = append(out, fmt.Sprintf("%s=%d", k, d))
		}
	}
	sort.Strings(out)
	return out
}
