package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// defaultCapacity is given to a volume whose claim asks for no size.
const defaultCapacity = 1 << 30

// Driver implements the CSI services over a Store.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	csi.UnimplementedSnapshotMetadataServer
	csi.UnimplementedGroupControllerServer

	store  *Store
	nodeID string
	// publishMu serialises mounts and loop devices on the node.
	publishMu sync.Mutex
}

// storeError maps the store's errors to CSI codes.
func storeError(what string, err error) error {
	switch {
	case errors.Is(err, errAlreadyExists):
		return status.Errorf(codes.AlreadyExists, "%s: %v", what, err)
	case errors.Is(err, errSourceNotFound):
		return status.Errorf(codes.NotFound, "%s: %v", what, err)
	default:
		return status.Errorf(codes.Internal, "%s: %v", what, err)
	}
}

// Identity

func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: DriverName, VendorVersion: Version}, nil
}

func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}},
	}, {
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE}},
	}, {
		// The external-snapshot-metadata sidecar refuses to start without it.
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE}},
	}}}, nil
}

func (d *Driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

// Controller

func controllerCapability(c csi.ControllerServiceCapability_RPC_Type) *csi.ControllerServiceCapability {
	return &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: c}}}
}

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{
		controllerCapability(csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME),
		controllerCapability(csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT),
		controllerCapability(csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS),
		controllerCapability(csi.ControllerServiceCapability_RPC_CLONE_VOLUME),
	}}, nil
}

// modeOf returns the mode the capabilities ask for; mixing is refused.
func modeOf(caps []*csi.VolumeCapability) (Mode, error) {
	if len(caps) == 0 {
		return "", status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	mode := Mode("")
	for _, c := range caps {
		m := Filesystem
		if c.GetBlock() != nil {
			m = Block
		}
		if mode != "" && m != mode {
			return "", status.Error(codes.InvalidArgument, "a volume is either block or filesystem, not both")
		}
		mode = m
	}
	return mode, nil
}

func (d *Driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := checkID(req.GetName()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	mode, err := modeOf(req.GetVolumeCapabilities())
	if err != nil {
		return nil, err
	}
	capacity := req.GetCapacityRange().GetRequiredBytes()
	if capacity == 0 {
		capacity = defaultCapacity
	}
	want := Volume{ID: req.GetName(), Mode: mode, CapacityBytes: capacity}
	if src := req.GetVolumeContentSource(); src != nil {
		want.SourceSnapshot = src.GetSnapshot().GetSnapshotId()
		want.SourceVolume = src.GetVolume().GetVolumeId()
	}
	vol, err := d.store.CreateVolume(want)
	if err != nil {
		return nil, storeError("volume "+want.ID, err)
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:      vol.ID,
		CapacityBytes: vol.CapacityBytes,
		ContentSource: req.GetVolumeContentSource(),
	}}, nil
}

func (d *Driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := checkID(req.GetVolumeId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := d.store.DeleteVolume(req.GetVolumeId()); err != nil {
		return nil, storeError("volume "+req.GetVolumeId(), err)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *Driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	vol, err := d.store.GetVolume(req.GetVolumeId())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if vol == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", req.GetVolumeId())
	}
	mode, err := modeOf(req.GetVolumeCapabilities())
	if err != nil {
		return nil, err
	}
	if mode != vol.Mode {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %s is %s", vol.ID, vol.Mode)}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeCapabilities: req.GetVolumeCapabilities(),
	}}, nil
}

func csiSnapshot(s *Snapshot) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:     s.ID,
		SourceVolumeId: s.SourceVolumeID,
		SizeBytes:      s.SizeBytes,
		CreationTime:   timestamppb.New(s.CreatedAt),
		ReadyToUse:     true,
	}
}

func (d *Driver) CreateSnapshot(_ context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := checkID(req.GetName()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := checkID(req.GetSourceVolumeId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	snap, err := d.store.CreateSnapshot(req.GetName(), req.GetSourceVolumeId())
	if err != nil {
		return nil, storeError("snapshot "+req.GetName(), err)
	}
	return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(snap)}, nil
}

func (d *Driver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if err := checkID(req.GetSnapshotId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := d.store.DeleteSnapshot(req.GetSnapshotId()); err != nil {
		return nil, storeError("snapshot "+req.GetSnapshotId(), err)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (d *Driver) ListSnapshots(_ context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetStartingToken() != "" {
		return nil, status.Error(codes.Aborted, "this driver returns every snapshot in one page")
	}
	snaps, err := d.store.ListSnapshots()
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	resp := &csi.ListSnapshotsResponse{}
	for i := range snaps {
		s := &snaps[i]
		if (req.GetSnapshotId() != "" && s.ID != req.GetSnapshotId()) ||
			(req.GetSourceVolumeId() != "" && s.SourceVolumeID != req.GetSourceVolumeId()) {
			continue
		}
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: csiSnapshot(s)})
	}
	return resp, nil
}

// Node

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// NodePublishVolume bind-mounts the volume's directory (or, for a block
// volume, the loop device its image is attached to) at the target path the
// kubelet gives. Publishing what is already published succeeds.
func (d *Driver) NodePublishVolume(_ context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if target == "" || req.GetVolumeCapability() == nil {
		return nil, status.Error(codes.InvalidArgument, "target path and volume capability are required")
	}
	vol, err := d.store.GetVolume(req.GetVolumeId())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if vol == nil {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", req.GetVolumeId())
	}
	d.publishMu.Lock()
	defer d.publishMu.Unlock()
	mounted, err := isMountPoint(target)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if mounted {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	source := d.store.DataPath("volumes", vol.ID, vol.Mode)
	if vol.Mode == Block {
		if source, err = attachLoop(source); err != nil {
			return nil, status.Errorf(codes.Internal, "attaching %s: %v", vol.ID, err)
		}
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		f, err := os.OpenFile(target, os.O_CREATE, 0o660)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		f.Close()
	} else if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return nil, status.Errorf(codes.Internal, "bind-mounting %s at %s: %v", source, target, err)
	}
	if req.GetReadonly() {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			unix.Unmount(target, 0)
			return nil, status.Errorf(codes.Internal, "making %s read-only: %v", target, err)
		}
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target, removes it and, for a block
// volume, detaches its loop device. A target that is gone is unpublished.
func (d *Driver) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	}
	d.publishMu.Lock()
	defer d.publishMu.Unlock()
	mounted, err := isMountPoint(target)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if mounted {
		if err := unix.Unmount(target, 0); err != nil {
			return nil, status.Errorf(codes.Internal, "unmounting %s: %v", target, err)
		}
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if vol, err := d.store.GetVolume(req.GetVolumeId()); err == nil && vol != nil && vol.Mode == Block {
		if err := detachLoops(d.store.DataPath("volumes", vol.ID, vol.Mode)); err != nil {
			return nil, status.Errorf(codes.Internal, "detaching %s: %v", vol.ID, err)
		}
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// isMountPoint reports whether path is the mount point of a mount in this
// mount namespace, by reading /proc/self/mountinfo (a bind mount of a
// directory of the same file system has no other tell-tale).
func isMountPoint(path string) (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	defer f.Close()
	clean := filepath.Clean(path)
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 64*1024), 1024*1024)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) > 4 && unescapeMountPath(fields[4]) == clean {
			return true, nil
		}
	}
	return false, scanner.Err()
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// attachLoop attaches image to a loop device (or finds the one it is
// attached to) and returns the device's path.
func attachLoop(image string) (string, error) {
	if dev, err := loopsOf(image); err != nil || len(dev) > 0 {
		if len(dev) > 0 {
			return dev[0], nil
		}
		return "", err
	}
	out, err := exec.Command("losetup", "--find", "--show", image).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("losetup: %v: %s", err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

func loopsOf(image string) ([]string, error) {
	out, err := exec.Command("losetup", "--noheadings", "--output", "NAME", "--associated", image).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("losetup: %v: %s", err, out)
	}
	return strings.Fields(string(out)), nil
}

func detachLoops(image string) error {
	devs, err := loopsOf(image)
	if err != nil {
		return err
	}
	for _, dev := range devs {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			return fmt.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	}
	return nil
}
