// csiregistrar stands in for the Kubernetes CSI project's node-driver-registrar sidecar,
// whose Go module the testbed's module proxy does not serve. The chart runs the standard
// sidecar beside the csi.sdfleet.io node plugin; the testbed runs this one in its place,
// from an image of its own, with the same flags and the same two protocols:
//   - it dials the plugin's socket (--csi-address), waiting for it, and asks its name
//     (csi.v1.Identity/GetPluginInfo), as the real one does;
//   - it serves the kubelet's plugin-registration API on
//     <--plugin-registration-path>/<driver>-reg.sock; the kubelet's plugin watcher finds
//     it, asks GetInfo, and gets --kubelet-registration-path as the endpoint to dial;
//   - a refused registration ends the process with an error (the real one exits too).
//
// Where it differs: no health endpoint (--http-endpoint), no mode for checking the
// registration from a liveness probe, no Windows paths, and it leaves klog's flags out.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registration struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
	refused        chan string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.name,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("%s registered with the kubelet", r.name)
	} else {
		r.refused <- s.Error
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// driverName asks the plugin its name, retrying until it answers (it may start later).
func driverName(address string) string {
	target := "unix://" + strings.TrimPrefix(address, "unix://")
	for attempt := 1; ; attempt++ {
		conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			info, err2 := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
			cancel()
			_ = conn.Close()
			if err2 == nil && info.GetName() != "" {
				return info.GetName()
			}
			err = err2
		}
		if attempt%10 == 1 {
			log.Printf("waiting for the CSI plugin at %s: %v", address, err)
		}
		time.Sleep(time.Second)
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the plugin's socket, as this container sees it")
	kubeletPath := flag.String("kubelet-registration-path", "", "the plugin's socket on the host, which the kubelet dials")
	regDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugins_registry directory, as this container sees it")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	name := driverName(*csiAddress)
	sock := filepath.Join(*regDir, name+"-reg.sock")
	_ = os.Remove(sock) // left by an earlier run
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatalf("listen on %s: %v", sock, err)
	}
	reg := &registration{name: name, endpoint: *kubeletPath, refused: make(chan string, 1)}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, reg)
	go func() { _ = srv.Serve(lis) }()
	log.Printf("registering %s at %s (the kubelet dials %s)", name, sock, *kubeletPath)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	code := 0
	select {
	case sig := <-stop:
		log.Printf("%v: stopping", sig)
	case why := <-reg.refused:
		log.Printf("the kubelet refused the registration of %s: %s", name, why)
		code = 1
	}
	srv.Stop()
	_ = os.Remove(sock)
	os.Exit(code)
}
