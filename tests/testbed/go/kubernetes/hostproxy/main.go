// hostproxy makes the testbed's loopback services (the apiserver, moto) reachable from
// pods on the real node: pods live on the testbed's bridge and cannot reach the host's
// 127.0.0.1, so it listens on the bridge address and copies each connection to the same
// port on 127.0.0.1. One process for every port, so `testbed down` stops it whole (a
// forking proxy would leave a child per open connection behind).
//
//	hostproxy -listen 10.88.0.1 -port 6443 -port 5000
package main

import (
	"flag"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
)

type ports []string

func (p *ports) String() string     { return strings.Join(*p, ",") }
func (p *ports) Set(v string) error { *p = append(*p, v); return nil }

func forward(client net.Conn, port string) {
	defer client.Close()
	upstream, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		log.Printf("127.0.0.1:%s: %v", port, err)
		return
	}
	defer upstream.Close()
	done := make(chan struct{}, 2)
	copyHalf := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		// Half-close so the peer sees the end of a request body or response.
		if tcp, ok := dst.(*net.TCPConn); ok {
			_ = tcp.CloseWrite()
		}
		done <- struct{}{}
	}
	go copyHalf(upstream, client)
	go copyHalf(client, upstream)
	<-done
	<-done
}

func main() {
	listen := flag.String("listen", "", "the bridge address to listen on")
	var list ports
	flag.Var(&list, "port", "a port of 127.0.0.1 to forward (repeat)")
	flag.Parse()
	if *listen == "" || len(list) == 0 {
		log.Fatal("usage: hostproxy -listen ADDRESS -port PORT...")
	}
	for _, port := range list {
		if _, err := strconv.Atoi(port); err != nil {
			log.Fatalf("not a port: %q", port)
		}
		lis, err := net.Listen("tcp", net.JoinHostPort(*listen, port))
		if err != nil {
			log.Fatal(err)
		}
		go func(port string) {
			for {
				c, err := lis.Accept()
				if err != nil {
					log.Fatal(err)
				}
				go forward(c, port)
			}
		}(port)
		log.Printf("%s:%s -> 127.0.0.1:%s", *listen, port, port)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
