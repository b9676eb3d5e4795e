// A helloworld Greeter written the way a Go team registers its services today: etcd's
// naming/endpoints Manager writes the record, a lease kept alive by clientv3 holds it, and on
// SIGTERM the server deletes its endpoint, revokes the lease, serves on for a short grace while
// clients drop it, then stops gracefully.
//
// It is a peer for the interoperability tests, written against stock packages only: nothing in it
// knows about the Rust registry.
//
// Output (stdout), one line each, for the tests to wait on:
//
//	serving on 127.0.0.1:PORT
//	registered services/helloworld/go-PORT lease 694d7a1f2b3c4d5e
//	stopped after serving N calls
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/endpoints"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "helloworld"
)

type greeter struct {
	id, addr string
	served   int64
}

func (g *greeter) SayHello(ctx context.Context, in *pb.HelloRequest) (*pb.HelloReply, error) {
	atomic.AddInt64(&g.served, 1)
	return &pb.HelloReply{
		Message:    fmt.Sprintf("Hello %s, from %s", in.GetName(), g.id),
		InstanceId: g.id,
		Addr:       g.addr,
	}, nil
}

func main() {
	etcdEndpoints := flag.String("etcd-endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	target := flag.String("target", "services/helloworld", "the naming target; clients dial etcd:///TARGET")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0 picks a free one)")
	id := flag.String("id", "", "instance id, the last segment of the key [default: go-PORT]")
	ttl := flag.Int64("ttl", 10, "lease TTL in seconds")
	grace := flag.Duration("grace", 500*time.Millisecond, "after revoking, serve this long before GracefulStop")
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)

	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *listen, err)
	}
	addr := lis.Addr().String()
	if *id == "" {
		*id = "go-" + addr[strings.LastIndex(addr, ":")+1:]
	}

	g := &greeter{id: *id, addr: addr}
	srv := grpc.NewServer()
	pb.RegisterGreeterServer(srv, g)
	healthSrv := health.NewServer()
	healthpb.RegisterHealthServer(srv, healthSrv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	fmt.Printf("serving on %s\n", addr)

	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*etcdEndpoints, ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		log.Fatalf("etcd client for %s: %v", *etcdEndpoints, err)
	}
	defer cli.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	lease, err := cli.Grant(ctx, *ttl)
	if err != nil {
		log.Fatalf("granting a %ds lease at %s: %v", *ttl, *etcdEndpoints, err)
	}
	manager, err := endpoints.NewManager(cli, *target)
	if err != nil {
		log.Fatalf("endpoints manager for %s: %v", *target, err)
	}
	key := *target + "/" + *id
	err = manager.AddEndpoint(ctx, key, endpoints.Endpoint{Addr: addr}, clientv3.WithLease(lease.ID))
	cancel()
	if err != nil {
		log.Fatalf("registering %s: %v", key, err)
	}
	// clientv3 sends the keep-alives itself; the channel must be drained or it stops.
	alive, err := cli.KeepAlive(context.Background(), lease.ID)
	if err != nil {
		log.Fatalf("keeping lease %x alive: %v", lease.ID, err)
	}
	go func() {
		for range alive {
		}
		log.Printf("keep-alive of lease %x ended", lease.ID)
	}()
	fmt.Printf("registered %s lease %x\n", key, lease.ID)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-signals:
	case err := <-served:
		log.Fatalf("serving on %s failed: %v", addr, err)
	}

	// Out of the registry first, so clients stop picking this instance, then stop.
	healthSrv.Shutdown()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	if err := manager.DeleteEndpoint(ctx, key); err != nil {
		log.Printf("deleting %s: %v (it expires with its lease)", key, err)
	}
	if _, err := cli.Revoke(ctx, lease.ID); err != nil {
		log.Printf("revoking lease %x: %v", lease.ID, err)
	}
	cancel()
	time.Sleep(*grace)
	srv.GracefulStop()
	fmt.Printf("stopped after serving %d calls\n", atomic.LoadInt64(&g.served))
}
