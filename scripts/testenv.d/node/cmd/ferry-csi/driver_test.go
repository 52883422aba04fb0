package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// client starts the driver on a socket in a temporary directory and returns
// a connection to it, as the sidecars and the kubelet connect.
func client(t *testing.T) (*grpc.ClientConn, *Store) {
	t.Helper()
	dir := t.TempDir()
	store, err := OpenStore(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	driver := &Driver{store: store, nodeID: "node-1"}
	socket := filepath.Join(dir, "csi.sock")
	server, err := serve(socket, func(s *grpc.Server) {
		csi.RegisterIdentityServer(s, driver)
		csi.RegisterControllerServer(s, driver)
		csi.RegisterNodeServer(s, driver)
		csi.RegisterSnapshotMetadataServer(s, driver)
		csi.RegisterGroupControllerServer(s, driver)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(server.Stop)
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, store
}

func capability(block bool) []*csi.VolumeCapability {
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if block {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}
	}
	return []*csi.VolumeCapability{c}
}

func TestFilesystemVolumeSnapshotAndRestore(t *testing.T) {
	conn, store := client(t)
	ctx := context.Background()
	ctl := csi.NewControllerClient(conn)

	vol, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: capability(false),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	data := store.DataPath("volumes", vol.Volume.VolumeId, Filesystem)
	if err := os.WriteFile(filepath.Join(data, "hello.txt"), []byte("kept by the snapshot"), 0o644); err != nil {
		t.Fatal(err)
	}
	snap, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snapshot-1", SourceVolumeId: "pvc-1"})
	if err != nil {
		t.Fatal(err)
	}
	if !snap.Snapshot.ReadyToUse || snap.Snapshot.SourceVolumeId != "pvc-1" {
		t.Fatalf("snapshot not ready or of the wrong volume: %v", snap.Snapshot)
	}
	// A change after the snapshot is not in it.
	if err := os.WriteFile(filepath.Join(data, "hello.txt"), []byte("changed later"), 0o644); err != nil {
		t.Fatal(err)
	}
	restored, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-2", VolumeCapabilities: capability(false),
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snapshot-1"}}}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(store.DataPath("volumes", restored.Volume.VolumeId, Filesystem), "hello.txt"))
	if err != nil || string(got) != "kept by the snapshot" {
		t.Fatalf("restored volume holds %q (%v)", got, err)
	}

	// Retried calls are idempotent; a name reused for another source is refused.
	if _, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snapshot-1", SourceVolumeId: "pvc-1"}); err != nil {
		t.Fatalf("retried CreateSnapshot: %v", err)
	}
	_, err = ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snapshot-1", SourceVolumeId: "pvc-2"})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("snapshot name reused for another volume: %v, want AlreadyExists", err)
	}
	_, err = ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-3", VolumeCapabilities: capability(false),
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snapshot-missing"}}}})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("volume from a missing snapshot: %v, want NotFound", err)
	}

	list, err := ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: "pvc-1"})
	if err != nil || len(list.Entries) != 1 {
		t.Fatalf("ListSnapshots: %v entries, %v", len(list.GetEntries()), err)
	}
	for _, id := range []string{"pvc-1", "pvc-1"} { // the second delete finds nothing and succeeds
		if _, err := ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("DeleteVolume %s: %v", id, err)
		}
	}
	if _, err := os.Stat(data); !os.IsNotExist(err) {
		t.Fatalf("deleted volume's data is still there: %v", err)
	}
	_, err = ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "../escape"})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a volume id with a path in it: %v, want InvalidArgument", err)
	}
}

func writeAt(t *testing.T, path string, offset int64, fill byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, blockSize)
	for i := range buf {
		buf[i] = fill
	}
	if _, err := f.WriteAt(buf, offset); err != nil {
		t.Fatal(err)
	}
}

func allocated(t *testing.T, client csi.SnapshotMetadataClient, snapshot string) []Range {
	t.Helper()
	stream, err := client.GetMetadataAllocated(context.Background(), &csi.GetMetadataAllocatedRequest{SnapshotId: snapshot, MaxResults: 1})
	if err != nil {
		t.Fatal(err)
	}
	var out []Range
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range msg.BlockMetadata {
			out = append(out, Range{b.ByteOffset, b.SizeBytes})
		}
	}
}

// The sidecars decide from the plugin capabilities what they serve: the
// snapshot metadata sidecar exits at start unless SNAPSHOT_METADATA_SERVICE
// is among them.
func TestPluginCapabilities(t *testing.T) {
	conn, _ := client(t)
	resp, err := csi.NewIdentityClient(conn).GetPluginCapabilities(context.Background(), &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[csi.PluginCapability_Service_Type]bool{}
	for _, c := range resp.GetCapabilities() {
		got[c.GetService().GetType()] = true
	}
	for _, want := range []csi.PluginCapability_Service_Type{
		csi.PluginCapability_Service_CONTROLLER_SERVICE,
		csi.PluginCapability_Service_GROUP_CONTROLLER_SERVICE,
		csi.PluginCapability_Service_SNAPSHOT_METADATA_SERVICE,
	} {
		if !got[want] {
			t.Errorf("plugin capabilities %v lack %v", resp.GetCapabilities(), want)
		}
	}
}

func TestBlockSnapshotMetadata(t *testing.T) {
	conn, store := client(t)
	ctx := context.Background()
	ctl := csi.NewControllerClient(conn)
	meta := csi.NewSnapshotMetadataClient(conn)

	const capacity = 8 << 20
	if _, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-block", VolumeCapabilities: capability(true),
		CapacityRange: &csi.CapacityRange{RequiredBytes: capacity}}); err != nil {
		t.Fatal(err)
	}
	image := store.DataPath("volumes", "pvc-block", Block)
	writeAt(t, image, 0, 'a')
	writeAt(t, image, 4<<20, 'b')
	if _, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: "pvc-block"}); err != nil {
		t.Fatal(err)
	}
	writeAt(t, image, 64<<10, 'c') // new data in a hole
	writeAt(t, image, 4<<20, 'd')  // changed data
	writeAt(t, image, 6<<20, 0)    // zeros written into a hole change nothing a reader sees
	if _, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-2", SourceVolumeId: "pvc-block"}); err != nil {
		t.Fatal(err)
	}

	// Allocated: the two written blocks of a sparse 8 MiB image, nothing else.
	ranges := allocated(t, meta, "snap-1")
	var total int64
	covers := map[int64]bool{}
	for _, r := range ranges {
		total += r.Length
		for _, at := range []int64{0, 4 << 20} {
			if at >= r.Offset && at < r.Offset+r.Length {
				covers[at] = true
			}
		}
	}
	if !covers[0] || !covers[4<<20] || total >= capacity/2 {
		t.Fatalf("allocated ranges %v (total %d) should cover offsets 0 and 4 MiB of a sparse image", ranges, total)
	}

	stream, err := meta.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: "snap-1", TargetSnapshotId: "snap-2"})
	if err != nil {
		t.Fatal(err)
	}
	var delta []Range
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if msg.VolumeCapacityBytes != capacity {
			t.Fatalf("capacity %d, want %d", msg.VolumeCapacityBytes, capacity)
		}
		for _, b := range msg.BlockMetadata {
			delta = append(delta, Range{b.ByteOffset, b.SizeBytes})
		}
	}
	want := []Range{{64 << 10, blockSize}, {4 << 20, blockSize}}
	if len(delta) != len(want) || delta[0] != want[0] || delta[1] != want[1] {
		t.Fatalf("changed blocks %v, want %v", delta, want)
	}

	// Resuming from an offset skips what was already received.
	stream, err = meta.GetMetadataDelta(ctx, &csi.GetMetadataDeltaRequest{BaseSnapshotId: "snap-1", TargetSnapshotId: "snap-2", StartingOffset: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := stream.Recv()
	if err != nil || len(msg.BlockMetadata) != 1 || msg.BlockMetadata[0].ByteOffset != 4<<20 {
		t.Fatalf("delta from 1 MiB: %v, %v", msg, err)
	}

	// Filesystem snapshots have no block metadata.
	if _, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-fs", VolumeCapabilities: capability(false)}); err != nil {
		t.Fatal(err)
	}
	if _, err := ctl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-fs", SourceVolumeId: "pvc-fs"}); err != nil {
		t.Fatal(err)
	}
	s, err := meta.GetMetadataAllocated(ctx, &csi.GetMetadataAllocatedRequest{SnapshotId: "snap-fs"})
	if err == nil {
		_, err = s.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("block metadata of a filesystem snapshot: %v, want InvalidArgument", err)
	}
}

func TestVolumeGroupSnapshot(t *testing.T) {
	conn, store := client(t)
	ctx := context.Background()
	ctl := csi.NewControllerClient(conn)
	group := csi.NewGroupControllerClient(conn)

	caps, err := group.GroupControllerGetCapabilities(ctx, &csi.GroupControllerGetCapabilitiesRequest{})
	if err != nil || caps.Capabilities[0].GetRpc().GetType() != csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT {
		t.Fatalf("group capabilities: %v, %v", caps, err)
	}
	for _, name := range []string{"pvc-a", "pvc-b"} {
		if _, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: capability(false)}); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(store.DataPath("volumes", name, Filesystem), "f"), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	req := &csi.CreateVolumeGroupSnapshotRequest{Name: "group-1", SourceVolumeIds: []string{"pvc-b", "pvc-a"}}
	created, err := group.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	g := created.GroupSnapshot
	if !g.ReadyToUse || len(g.Snapshots) != 2 {
		t.Fatalf("group snapshot: %v", g)
	}
	ids := map[string]string{}
	for _, s := range g.Snapshots {
		if s.GroupSnapshotId != "group-1" {
			t.Fatalf("member %s names group %q", s.SnapshotId, s.GroupSnapshotId)
		}
		ids[s.SourceVolumeId] = s.SnapshotId
	}
	// Each member holds its own volume's data and restores like any snapshot.
	restored, err := ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-c", VolumeCapabilities: capability(false),
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: ids["pvc-b"]}}}})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(store.DataPath("volumes", restored.Volume.VolumeId, Filesystem), "f"))
	if err != nil || string(got) != "pvc-b" {
		t.Fatalf("volume from member snapshot holds %q (%v)", got, err)
	}
	// A retry returns the same group; the name with other volumes is refused.
	again, err := group.CreateVolumeGroupSnapshot(ctx, req)
	if err != nil || len(again.GroupSnapshot.Snapshots) != 2 {
		t.Fatalf("retried CreateVolumeGroupSnapshot: %v, %v", again, err)
	}
	_, err = group.CreateVolumeGroupSnapshot(ctx, &csi.CreateVolumeGroupSnapshotRequest{Name: "group-1", SourceVolumeIds: []string{"pvc-a"}})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("group name reused for other volumes: %v, want AlreadyExists", err)
	}
	if _, err := group.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: "group-1"}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // the second delete finds nothing and succeeds
		if _, err := group.DeleteVolumeGroupSnapshot(ctx, &csi.DeleteVolumeGroupSnapshotRequest{GroupSnapshotId: "group-1"}); err != nil {
			t.Fatalf("DeleteVolumeGroupSnapshot: %v", err)
		}
	}
	if snap, err := store.GetSnapshot(ids["pvc-a"]); err != nil || snap != nil {
		t.Fatalf("member snapshot outlived its group: %v, %v", snap, err)
	}
	_, err = group.GetVolumeGroupSnapshot(ctx, &csi.GetVolumeGroupSnapshotRequest{GroupSnapshotId: "group-1"})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("deleted group: %v, want NotFound", err)
	}
}
