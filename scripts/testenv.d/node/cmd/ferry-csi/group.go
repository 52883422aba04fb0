package main

import (
	"context"
	"os"
	"sort"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Group is what the store records of a volume group snapshot: the member
// snapshots, one per source volume, all copied under one hold of the
// store's lock so that no change to the store falls between them.
type Group struct {
	ID          string    `json:"id"`
	SnapshotIDs []string  `json:"snapshotIds"`
	CreatedAt   time.Time `json:"createdAt"`
}

// memberID names the snapshot of volumeID in group: the same request
// always names the same snapshots, so a retried create is idempotent.
func memberID(group, volumeID string) string {
	return group + "-" + volumeID
}

// CreateGroup snapshots every volume of volumeIDs under one hold of the
// lock. A group of the same name and volumes is returned as it is.
func (s *Store) CreateGroup(id string, volumeIDs []string) (*Group, []Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sorted := append([]string(nil), volumeIDs...)
	sort.Strings(sorted)
	var existing Group
	found, err := s.readRecord("groups", id, &existing)
	if err != nil {
		return nil, nil, err
	}
	if found {
		var want []string
		for _, v := range sorted {
			want = append(want, memberID(id, v))
		}
		if !equalStrings(want, existing.SnapshotIDs) {
			return nil, nil, errAlreadyExists
		}
		snaps, err := s.members(&existing)
		return &existing, snaps, err
	}
	group := Group{ID: id, CreatedAt: time.Now().UTC()}
	var snaps []Snapshot
	for _, volumeID := range sorted {
		if err := checkID(volumeID); err != nil {
			return nil, nil, err
		}
		snap, err := s.createSnapshotLocked(memberID(id, volumeID), volumeID)
		if err != nil {
			return nil, nil, err
		}
		group.SnapshotIDs = append(group.SnapshotIDs, snap.ID)
		snaps = append(snaps, *snap)
	}
	if err := s.writeRecord("groups", id, group); err != nil {
		return nil, nil, err
	}
	return &group, snaps, nil
}

func (s *Store) members(g *Group) ([]Snapshot, error) {
	var snaps []Snapshot
	for _, id := range g.SnapshotIDs {
		snap, err := s.GetSnapshot(id)
		if err != nil {
			return nil, err
		}
		if snap != nil {
			snaps = append(snaps, *snap)
		}
	}
	return snaps, nil
}

// GetGroup returns the group and its members still present, or nil.
func (s *Store) GetGroup(id string) (*Group, []Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var group Group
	found, err := s.readRecord("groups", id, &group)
	if err != nil || !found {
		return nil, nil, err
	}
	snaps, err := s.members(&group)
	return &group, snaps, err
}

// DeleteGroup removes the group's member snapshots, then its record; a
// missing group is already deleted.
func (s *Store) DeleteGroup(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var group Group
	found, err := s.readRecord("groups", id, &group)
	if err != nil || !found {
		return err
	}
	for _, snap := range group.SnapshotIDs {
		if err := s.deleteSnapshotLocked(snap); err != nil {
			return err
		}
	}
	return os.Remove(s.recordPath("groups", id))
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func csiGroup(g *Group, snaps []Snapshot) *csi.VolumeGroupSnapshot {
	out := &csi.VolumeGroupSnapshot{
		GroupSnapshotId: g.ID,
		CreationTime:    timestamppb.New(g.CreatedAt),
		ReadyToUse:      true,
	}
	for i := range snaps {
		member := csiSnapshot(&snaps[i])
		member.GroupSnapshotId = g.ID
		out.Snapshots = append(out.Snapshots, member)
	}
	return out
}

// Group controller

func (d *Driver) GroupControllerGetCapabilities(context.Context, *csi.GroupControllerGetCapabilitiesRequest) (*csi.GroupControllerGetCapabilitiesResponse, error) {
	return &csi.GroupControllerGetCapabilitiesResponse{Capabilities: []*csi.GroupControllerServiceCapability{{
		Type: &csi.GroupControllerServiceCapability_Rpc{Rpc: &csi.GroupControllerServiceCapability_RPC{
			Type: csi.GroupControllerServiceCapability_RPC_CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,
		}},
	}}}, nil
}

func (d *Driver) CreateVolumeGroupSnapshot(_ context.Context, req *csi.CreateVolumeGroupSnapshotRequest) (*csi.CreateVolumeGroupSnapshotResponse, error) {
	if err := checkID(req.GetName()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if len(req.GetSourceVolumeIds()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "a group snapshot needs source volumes")
	}
	group, snaps, err := d.store.CreateGroup(req.GetName(), req.GetSourceVolumeIds())
	if err != nil {
		return nil, storeError("group snapshot "+req.GetName(), err)
	}
	return &csi.CreateVolumeGroupSnapshotResponse{GroupSnapshot: csiGroup(group, snaps)}, nil
}

func (d *Driver) DeleteVolumeGroupSnapshot(_ context.Context, req *csi.DeleteVolumeGroupSnapshotRequest) (*csi.DeleteVolumeGroupSnapshotResponse, error) {
	if err := checkID(req.GetGroupSnapshotId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := d.store.DeleteGroup(req.GetGroupSnapshotId()); err != nil {
		return nil, storeError("group snapshot "+req.GetGroupSnapshotId(), err)
	}
	return &csi.DeleteVolumeGroupSnapshotResponse{}, nil
}

func (d *Driver) GetVolumeGroupSnapshot(_ context.Context, req *csi.GetVolumeGroupSnapshotRequest) (*csi.GetVolumeGroupSnapshotResponse, error) {
	if err := checkID(req.GetGroupSnapshotId()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	group, snaps, err := d.store.GetGroup(req.GetGroupSnapshotId())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if group == nil {
		return nil, status.Errorf(codes.NotFound, "group snapshot %s", req.GetGroupSnapshotId())
	}
	return &csi.GetVolumeGroupSnapshotResponse{GroupSnapshot: csiGroup(group, snaps)}, nil
}
