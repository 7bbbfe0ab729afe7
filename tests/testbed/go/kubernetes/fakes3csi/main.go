// fakes3csi stands in for the mountpoint-s3 CSI driver (s3.csi.aws.com) on the testbed's
// real kubelet. The operator gives ComfyUI pods an S3 volume through a statically
// provisioned PersistentVolume of that driver; with no node plugin for it the kubelet can
// never mount the volume and the pods stay in ContainerCreating. This plugin registers with
// the kubelet as the real one does (the plugin-registration API, a socket in
// <kubelet-root-dir>/plugins_registry), so the node's CSINode lists the driver, and it
// serves the CSI Identity and Node services on its own socket.
//
// With `authenticationSource: pod` in the PV's attributes it does what the real driver
// does first: it takes the kubelet's token for the pod's own ServiceAccount and fails the
// mount without one; it records that account (where the real driver would assume its
// IAM role) in <data-dir>/.identities/<volume handle>. It does not read the account's
// role annotation nor call STS.
//
// Where it differs from mountpoint-s3: NodePublishVolume bind-mounts a local directory,
// <data-dir>/<volume handle>, onto the pod's target path instead of mounting a bucket
// through FUSE. The files stay in that directory and nothing ever reaches S3: the bucket
// name and the PV's mount options (allow-other, region, prefix) are ignored. The directory
// is mode 0777 so that any pod uid can write, as mountpoint-s3's allow-other and uid
// options allow. That is enough here: the operator's gateway uploads outputs to S3 itself,
// and the volume only has to mount for ComfyUI pods to start. There is no Controller
// service (static provisioning needs none) and no staging (NodeGetCapabilities lists none,
// so the kubelet calls NodePublishVolume directly).
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const driverName = "s3.csi.aws.com"

// registration answers the kubelet's plugin watcher, which finds the socket in its
// plugins_registry directory, asks GetInfo, then dials Endpoint for NodeGetInfo.
type registration struct {
	registerapi.UnimplementedRegistrationServer
	endpoint string
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              driverName,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("registered with the kubelet")
	} else {
		log.Printf("the kubelet refused the registration: %s", s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

type identity struct {
	csi.UnimplementedIdentityServer
}

func (identity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: driverName, VendorVersion: "testbed"}, nil
}

func (identity) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
}

func (identity) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil // Ready unset means ready
}

type node struct {
	csi.UnimplementedNodeServer
	nodeID  string
	dataDir string
}

func (n *node) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func (n *node) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.nodeID}, nil
}

func (n *node) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "" || id == "." || id == ".." || strings.ContainsRune(id, '/'):
		return nil, status.Errorf(codes.InvalidArgument, "volume id %q is not a usable directory name", id)
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target path is missing")
	case req.GetVolumeCapability() == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is missing")
	case req.GetVolumeCapability().GetMount() == nil:
		return nil, status.Error(codes.InvalidArgument, "only filesystem (mount) volumes are supported")
	}
	// Pod-level credentials, as the real driver takes them: the kubelet's token for the
	// pod's own ServiceAccount (the CSIDriver's tokenRequests, audience
	// sts.amazonaws.com); without one the mount fails. The identity it would assume
	// with is written down for the tests (outside the volume).
	if req.GetVolumeContext()["authenticationSource"] == "pod" {
		subject, err := podIdentity(req.GetVolumeContext())
		if err != nil {
			return nil, status.Errorf(codes.Unauthenticated, "authenticationSource pod: %v", err)
		}
		dir := filepath.Join(n.dataDir, ".identities")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, status.Errorf(codes.Internal, "create %s: %v", dir, err)
		}
		if err := os.WriteFile(filepath.Join(dir, id), []byte(subject+"\n"), 0o644); err != nil {
			return nil, status.Errorf(codes.Internal, "record the identity: %v", err)
		}
		log.Printf("volume %s mounted as %s", id, subject)
	}
	src := filepath.Join(n.dataDir, id)
	if err := os.MkdirAll(src, 0o777); err != nil {
		return nil, status.Errorf(codes.Internal, "create %s: %v", src, err)
	}
	if err := os.Chmod(src, 0o777); err != nil { // MkdirAll's mode is cut by the umask
		return nil, status.Errorf(codes.Internal, "chmod %s: %v", src, err)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "create %s: %v", target, err)
	}
	mounted, err := isMountPoint(target)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if mounted {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return nil, status.Errorf(codes.Internal, "bind-mount %s on %s: %v", src, target, err)
	}
	if req.GetReadonly() {
		// A bind mount takes MS_RDONLY only on a remount.
		if err := unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			_ = unix.Unmount(target, 0)
			return nil, status.Errorf(codes.Internal, "remount %s read-only: %v", target, err)
		}
	}
	log.Printf("published %s at %s (readonly=%v)", src, target, req.GetReadonly())
	return &csi.NodePublishVolumeResponse{}, nil
}

func (n *node) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if req.GetVolumeId() == "" || target == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id and target path are required")
	}
	if err := unix.Unmount(target, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return nil, status.Errorf(codes.Internal, "unmount %s: %v", target, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "remove %s: %v", target, err)
	}
	log.Printf("unpublished %s", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// podIdentity is the subject of the pod's ServiceAccount token for STS, from the
// kubelet's csi.storage.k8s.io/serviceAccount.tokens. The signature is not checked (STS
// would); the subject must be the pod's own ServiceAccount.
func podIdentity(volumeContext map[string]string) (string, error) {
	raw, ok := volumeContext["csi.storage.k8s.io/serviceAccount.tokens"]
	if !ok {
		return "", errors.New("the kubelet sent no ServiceAccount token (the CSIDriver needs tokenRequests for sts.amazonaws.com)")
	}
	var tokens map[string]struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(raw), &tokens); err != nil {
		return "", fmt.Errorf("the tokens are not JSON: %v", err)
	}
	token := tokens["sts.amazonaws.com"].Token
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", errors.New("no token for the audience sts.amazonaws.com")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", fmt.Errorf("the token's payload: %v", err)
	}
	var claims struct {
		Subject string `json:"sub"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return "", fmt.Errorf("the token's claims: %v", err)
	}
	want := "system:serviceaccount:" + volumeContext["csi.storage.k8s.io/pod.namespace"] + ":" + volumeContext["csi.storage.k8s.io/serviceAccount.name"]
	if claims.Subject != want {
		return "", fmt.Errorf("the token is for %q, not the pod's %q", claims.Subject, want)
	}
	return claims.Subject, nil
}

// isMountPoint says whether path is a mount point in /proc/self/mountinfo. A bind mount of
// a directory on the same filesystem keeps its device number, so stat cannot tell.
func isMountPoint(path string) (bool, error) {
	path = filepath.Clean(path)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && unescapeOctal(fields[4]) == path {
			return true, nil
		}
	}
	return false, s.Err()
}

// unescapeOctal undoes the kernel's \ooo escapes of space, tab, newline and backslash.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func listen(sock string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(sock), 0o750); err != nil {
		return nil, err
	}
	_ = os.Remove(sock) // left by an earlier run
	return net.Listen("unix", sock)
}

func main() {
	regDir := flag.String("registration-dir", "/var/lib/kubelet/plugins_registry", "the kubelet's plugin registry directory")
	csiSock := flag.String("csi-socket", "/var/lib/kubelet/plugins/"+driverName+"/csi.sock", "where to serve the CSI Identity and Node services")
	dataDir := flag.String("data-dir", "", "the directory that holds each volume's local directory")
	nodeID := flag.String("node-id", "", "the node id NodeGetInfo reports (the Node's name)")
	flag.Parse()
	if *dataDir == "" || *nodeID == "" {
		log.Fatal("--data-dir and --node-id are required")
	}
	if err := os.MkdirAll(*dataDir, 0o755); err != nil {
		log.Fatal(err)
	}
	regSock := filepath.Join(*regDir, driverName+"-reg.sock")

	// The CSI socket first: once the registration socket appears the kubelet dials it.
	csiLis, err := listen(*csiSock)
	if err != nil {
		log.Fatalf("listen on %s: %v", *csiSock, err)
	}
	csiSrv := grpc.NewServer()
	csi.RegisterIdentityServer(csiSrv, identity{})
	csi.RegisterNodeServer(csiSrv, &node{nodeID: *nodeID, dataDir: *dataDir})
	go func() { _ = csiSrv.Serve(csiLis) }()

	regLis, err := listen(regSock)
	if err != nil {
		csiSrv.Stop()
		_ = os.Remove(*csiSock)
		log.Fatalf("listen on %s: %v", regSock, err)
	}
	regSrv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(regSrv, &registration{endpoint: *csiSock})
	go func() { _ = regSrv.Serve(regLis) }()
	log.Printf("serving %s: registration at %s, CSI at %s, volumes under %s", driverName, regSock, *csiSock, *dataDir)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	sig := <-stop
	log.Printf("%v: stopping", sig)
	// The registration socket goes first, so the kubelet deregisters the driver.
	regSrv.Stop()
	_ = os.Remove(regSock)
	csiSrv.Stop()
	_ = os.Remove(*csiSock)
}
