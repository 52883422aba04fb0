// Command ferry-csi is the CSI driver of Ferry's test node: volumes are
// directories (or, in block mode, sparse image files behind loop devices)
// in a state directory on the node, snapshots are copies of them, and a
// volume can be created from a snapshot or cloned from another volume. It
// serves the CSI Identity, Controller, Node and SnapshotMetadata services on
// one Unix socket, which the upstream external-provisioner and
// csi-snapshotter use for the controller side and the external-snapshot-metadata
// sidecar for changed-block tracking, and registers itself with
// the kubelet through the kubelet's plugin registration API, as
// node-driver-registrar would for a production driver.
//
//	ferry-csi --endpoint /var/lib/kubelet/plugins/csi.ferry.dev/csi.sock \
//	  --registration-dir /var/lib/kubelet/plugins_registry \
//	  --state-dir /var/lib/ferry-csi --node-id node-1
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// DriverName is the name StorageClasses give as their provisioner.
const DriverName = "csi.ferry.dev"

// Version is reported by GetPluginInfo.
const Version = "0.1.0"

func main() {
	endpoint := flag.String("endpoint", "", "Unix socket the CSI services listen on")
	registrationDir := flag.String("registration-dir", "", "the kubelet's plugins_registry directory; empty: do not register with a kubelet")
	stateDir := flag.String("state-dir", "", "directory holding volumes and snapshots")
	nodeID := flag.String("node-id", "", "name of the node this driver serves (the Node object's name)")
	flag.Parse()
	if *endpoint == "" || *stateDir == "" || *nodeID == "" {
		log.Fatal("--endpoint, --state-dir and --node-id are required")
	}
	store, err := OpenStore(*stateDir)
	if err != nil {
		log.Fatalf("state directory %s: %v", *stateDir, err)
	}
	driver := &Driver{store: store, nodeID: *nodeID}

	server, err := serve(*endpoint, func(s *grpc.Server) {
		csi.RegisterIdentityServer(s, driver)
		csi.RegisterControllerServer(s, driver)
		csi.RegisterNodeServer(s, driver)
		csi.RegisterSnapshotMetadataServer(s, driver)
		csi.RegisterGroupControllerServer(s, driver)
	})
	if err != nil {
		log.Fatalf("CSI endpoint %s: %v", *endpoint, err)
	}
	var registrar *grpc.Server
	if *registrationDir != "" {
		socket := filepath.Join(*registrationDir, DriverName+"-reg.sock")
		registrar, err = serve(socket, func(s *grpc.Server) {
			registration.RegisterRegistrationServer(s, &Registrar{endpoint: *endpoint})
		})
		if err != nil {
			log.Fatalf("registration socket %s: %v", socket, err)
		}
	}
	log.Printf("%s %s serving on %s for node %s", DriverName, Version, *endpoint, *nodeID)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	if registrar != nil {
		registrar.Stop()
	}
	server.GracefulStop()
}

// serve listens on a fresh Unix socket at path and serves the services that
// register adds, in the background.
func serve(path string, register func(*grpc.Server)) (*grpc.Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	listener, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	server := grpc.NewServer(grpc.UnaryInterceptor(logErrors))
	register(server)
	go func() {
		if err := server.Serve(listener); err != nil {
			log.Printf("serving %s: %v", path, err)
		}
	}()
	return server, nil
}

// logErrors logs every failed call with its method, so the node's log says
// why a volume did not appear.
func logErrors(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	if err != nil {
		log.Printf("%s: %v", info.FullMethod, err)
	}
	return resp, err
}

// Registrar answers the kubelet's plugin watcher, which finds the
// registration socket in its plugins_registry directory.
type Registrar struct {
	registration.UnimplementedRegistrationServer
	endpoint string
}

func (r *Registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              DriverName,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *Registrar) NotifyRegistrationStatus(_ context.Context, status *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if !status.PluginRegistered {
		log.Printf("the kubelet refused the registration: %s", status.Error)
	} else {
		log.Printf("registered with the kubelet")
	}
	return &registration.RegistrationStatusResponse{}, nil
}
