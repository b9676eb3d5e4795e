// A stock grpc-go client of the helloworld Greeter: it dials etcd:///TARGET through etcd's naming
// resolver with the round_robin policy, exactly as etcd's documentation shows, and reports where
// every call went.
//
// One dial option goes beyond the documentation: -authority (default "helloworld"). grpc-go sends
// the dial target's endpoint, "services/helloworld", as the HTTP/2 :authority, and Rust's h2 (under
// tonic) rejects an authority containing '/' by resetting the stream with PROTOCOL_ERROR. Any
// valid authority works; -authority "" dials without the option, to show that failure.
//
// Output (stdout), one line per call, then a summary:
//
//	call UNIX_MS OUTCOME PEER INSTANCE LATENCY_US [MESSAGE]
//	instance ID COUNT
//	total N calls, F failed
//
// OUTCOME is "ok" or the gRPC code; PEER is the address the call was sent to ("-" when it never
// reached a connection). It calls until -requests calls are made, -duration has passed, or it gets
// SIGTERM/SIGINT; -concurrency N keeps N calls in flight, -quiet drops the per-call lines (for
// throughput runs). Exit status 0 when every call succeeded, 1 when some failed, 2 on bad use.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
	resolver "go.etcd.io/etcd/clientv3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "helloworld"
)

type tally struct {
	mu       sync.Mutex
	quiet    bool
	calls    int
	failed   int
	instance map[string]int
}

func (t *tally) record(start time.Time, p *peer.Peer, reply *pb.HelloReply, err error) {
	outcome, instance, at, message := "ok", "-", "-", ""
	if err != nil {
		st := status.Convert(err)
		outcome, message = st.Code().String(), strings.ReplaceAll(st.Message(), "\n", " ")
	} else {
		instance = reply.GetInstanceId()
	}
	if p.Addr != nil {
		at = p.Addr.String()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.calls++
	if err != nil {
		t.failed++
	} else {
		t.instance[instance]++
	}
	if !t.quiet {
		fmt.Printf("call %d %s %s %s %d %s\n", start.UnixNano()/1e6, outcome, at, instance,
			time.Since(start).Microseconds(), message)
	}
}

func main() {
	etcdEndpoints := flag.String("etcd-endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	target := flag.String("target", "services/helloworld", "the naming target to dial as etcd:///TARGET")
	authority := flag.String("authority", "helloworld", "HTTP/2 :authority to send; empty sends grpc-go's default (the target)")
	requests := flag.Int("requests", 0, "stop after this many calls (0: no limit)")
	duration := flag.Duration("duration", 0, "stop after this long (0: no limit)")
	rate := flag.Int("rate", 0, "calls per second, each in its own goroutine (0: one after another)")
	timeout := flag.Duration("timeout", 2*time.Second, "deadline of each call")
	warmup := flag.Int("warmup-instances", 0, "before counting, call until this many instances answered")
	concurrency := flag.Int("concurrency", 1, "without -rate: this many calls in flight, each caller one after another")
	quiet := flag.Bool("quiet", false, "no line per call, only the summary")
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if *concurrency < 1 {
		fmt.Fprintln(os.Stderr, "greeter_client: -concurrency must be at least 1")
		os.Exit(2)
	}
	if *requests == 0 && *duration == 0 {
		fmt.Fprintln(os.Stderr, "greeter_client: give -requests N or -duration D (or both)")
		os.Exit(2)
	}

	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*etcdEndpoints, ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		log.Fatalf("etcd client for %s: %v", *etcdEndpoints, err)
	}
	defer cli.Close()
	builder, err := resolver.NewBuilder(cli)
	if err != nil {
		log.Fatalf("etcd resolver: %v", err)
	}
	options := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithResolvers(builder),
		grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`),
	}
	if *authority != "" {
		options = append(options, grpc.WithAuthority(*authority))
	}
	conn, err := grpc.Dial("etcd:///"+*target, options...)
	if err != nil {
		log.Fatalf("dialing etcd:///%s: %v", *target, err)
	}
	defer conn.Close()
	greeter := pb.NewGreeterClient(conn)

	call := func() (*pb.HelloReply, *peer.Peer, time.Time, error) {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		var p peer.Peer
		start := time.Now()
		reply, err := greeter.SayHello(ctx, &pb.HelloRequest{Name: "go"}, grpc.Peer(&p))
		return reply, &p, start, err
	}

	if *warmup > 0 {
		seen := map[string]bool{}
		deadline := time.Now().Add(10 * time.Second)
		for len(seen) < *warmup {
			if time.Now().After(deadline) {
				log.Fatalf("only %d of %d instances answered within 10s", len(seen), *warmup)
			}
			if reply, _, _, err := call(); err == nil {
				seen[reply.GetInstanceId()] = true
			} else {
				time.Sleep(10 * time.Millisecond)
			}
		}
		fmt.Printf("warmed up: %d instances\n", len(seen))
	}

	t := &tally{instance: map[string]int{}, quiet: *quiet}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// Closed when the run is over (its -duration passed, or a signal came), for every caller.
	done := make(chan struct{})
	go func() {
		var end <-chan time.Time
		if *duration > 0 {
			end = time.After(*duration)
		}
		select {
		case <-end:
		case <-stop:
		}
		close(done)
	}()
	var inFlight sync.WaitGroup
	one := func() {
		defer inFlight.Done()
		reply, p, start, err := call()
		t.record(start, p, reply, err)
	}
	var tick <-chan time.Time
	if *rate > 0 {
		ticker := time.NewTicker(time.Second / time.Duration(*rate))
		defer ticker.Stop()
		tick = ticker.C
	}
	// Each call needs a turn: a tick of the rate, or (without -rate) a place in the budget of
	// -requests, taken by -concurrency callers one call after another.
	var made int64
	turn := func() bool {
		if *requests > 0 && atomic.AddInt64(&made, 1) > int64(*requests) {
			return false
		}
		select {
		case <-done:
			return false
		default:
			return true
		}
	}
	if tick != nil {
	ticking:
		for *requests == 0 || made < int64(*requests) {
			select {
			case <-tick:
			case <-done:
				break ticking
			}
			made++
			inFlight.Add(1)
			go one()
		}
	} else {
		for i := 0; i < *concurrency; i++ {
			inFlight.Add(1)
			go func() {
				defer inFlight.Done()
				for turn() {
					reply, p, start, err := call()
					t.record(start, p, reply, err)
				}
			}()
		}
	}
	inFlight.Wait()

	ids := make([]string, 0, len(t.instance))
	for id := range t.instance {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		fmt.Printf("instance %s %d\n", id, t.instance[id])
	}
	fmt.Printf("total %d calls, %d failed\n", t.calls, t.failed)
	if t.failed > 0 {
		os.Exit(1)
	}
}
