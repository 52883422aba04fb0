package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// blockSize is the granularity of changed-block tracking.
const blockSize = 4096

// defaultMaxResults bounds the ranges in one streamed message when the
// caller sets no limit.
const defaultMaxResults = 256

// Range is a run of bytes of a block volume.
type Range struct{ Offset, Length int64 }

// allocatedRanges lists the data (non-hole) extents of a sparse image from
// start on, as the file system reports them (SEEK_DATA / SEEK_HOLE).
func allocatedRanges(path string, start int64) ([]Range, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	size := info.Size()
	var out []Range
	for pos := start; pos < size; {
		data, err := unix.Seek(int(f.Fd()), pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after pos
		}
		if err != nil {
			return nil, 0, err
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return nil, 0, err
		}
		out = append(out, Range{Offset: data, Length: hole - data})
		pos = hole
	}
	return out, size, nil
}

// changedRanges compares two images of the same volume block by block from
// start on and returns the blocks of target that differ from base,
// adjacent blocks merged. A hole reads as zeros, as it does for a Pod.
func changedRanges(basePath, targetPath string, start int64) ([]Range, int64, error) {
	base, err := os.Open(basePath)
	if err != nil {
		return nil, 0, err
	}
	defer base.Close()
	target, err := os.Open(targetPath)
	if err != nil {
		return nil, 0, err
	}
	defer target.Close()
	info, err := target.Stat()
	if err != nil {
		return nil, 0, err
	}
	size := info.Size()
	start -= start % blockSize
	const window = 256 * blockSize
	a := make([]byte, window)
	b := make([]byte, window)
	var out []Range
	for pos := start; pos < size; pos += window {
		n, err := target.ReadAt(b, pos)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, 0, err
		}
		m, err := base.ReadAt(a[:n], pos)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, 0, err
		}
		clear(a[m:n]) // past the end of a smaller base: zeros
		for off := 0; off < n; off += blockSize {
			end := min(off+blockSize, n)
			if bytes.Equal(a[off:end], b[off:end]) {
				continue
			}
			at := pos + int64(off)
			if k := len(out); k > 0 && out[k-1].Offset+out[k-1].Length == at {
				out[k-1].Length += int64(end - off)
			} else {
				out = append(out, Range{Offset: at, Length: int64(end - off)})
			}
		}
	}
	return out, size, nil
}

func blockMetadata(ranges []Range) []*csi.BlockMetadata {
	out := make([]*csi.BlockMetadata, len(ranges))
	for i, r := range ranges {
		out[i] = &csi.BlockMetadata{ByteOffset: r.Offset, SizeBytes: r.Length}
	}
	return out
}

// batches splits ranges into messages of at most max ranges.
func batches(ranges []Range, max int32) [][]Range {
	if max <= 0 {
		max = defaultMaxResults
	}
	var out [][]Range
	for len(ranges) > int(max) {
		out = append(out, ranges[:max])
		ranges = ranges[max:]
	}
	if len(ranges) > 0 {
		out = append(out, ranges)
	}
	return out
}

// blockSnapshot returns the record of a snapshot of a block volume.
func (d *Driver) blockSnapshot(id string) (*Snapshot, error) {
	snap, err := d.store.GetSnapshot(id)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if snap == nil {
		return nil, status.Errorf(codes.NotFound, "snapshot %s does not exist", id)
	}
	if snap.Mode != Block {
		return nil, status.Errorf(codes.InvalidArgument, "snapshot %s is of a filesystem volume; block metadata exists for block volumes only", id)
	}
	return snap, nil
}

// GetMetadataAllocated streams the allocated ranges of a block snapshot.
func (d *Driver) GetMetadataAllocated(req *csi.GetMetadataAllocatedRequest, stream csi.SnapshotMetadata_GetMetadataAllocatedServer) error {
	snap, err := d.blockSnapshot(req.GetSnapshotId())
	if err != nil {
		return err
	}
	ranges, size, err := allocatedRanges(d.store.DataPath("snapshots", snap.ID, Block), req.GetStartingOffset())
	if err != nil {
		return status.Errorf(codes.Internal, "reading snapshot %s: %v", snap.ID, err)
	}
	for _, batch := range batches(ranges, req.GetMaxResults()) {
		if err := stream.Send(&csi.GetMetadataAllocatedResponse{
			BlockMetadataType:   csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: size,
			BlockMetadata:       blockMetadata(batch),
		}); err != nil {
			return err
		}
	}
	return nil
}

// GetMetadataDelta streams the ranges that changed between two snapshots of
// the same block volume.
func (d *Driver) GetMetadataDelta(req *csi.GetMetadataDeltaRequest, stream csi.SnapshotMetadata_GetMetadataDeltaServer) error {
	base, err := d.blockSnapshot(req.GetBaseSnapshotId())
	if err != nil {
		return err
	}
	target, err := d.blockSnapshot(req.GetTargetSnapshotId())
	if err != nil {
		return err
	}
	if base.SourceVolumeID != target.SourceVolumeID {
		return status.Error(codes.InvalidArgument,
			fmt.Sprintf("snapshots %s and %s are of different volumes (%s, %s)", base.ID, target.ID, base.SourceVolumeID, target.SourceVolumeID))
	}
	ranges, size, err := changedRanges(d.store.DataPath("snapshots", base.ID, Block), d.store.DataPath("snapshots", target.ID, Block), req.GetStartingOffset())
	if err != nil {
		return status.Errorf(codes.Internal, "comparing snapshots %s and %s: %v", base.ID, target.ID, err)
	}
	for _, batch := range batches(ranges, req.GetMaxResults()) {
		if err := stream.Send(&csi.GetMetadataDeltaResponse{
			BlockMetadataType:   csi.BlockMetadataType_VARIABLE_LENGTH,
			VolumeCapacityBytes: size,
			BlockMetadata:       blockMetadata(batch),
		}); err != nil {
			return err
		}
	}
	return nil
}
