package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"time"
)

// Mode is how a volume is presented to a Pod.
type Mode string

const (
	// Filesystem volumes are directories, bind-mounted into the Pod.
	Filesystem Mode = "filesystem"
	// Block volumes are sparse image files, attached to a loop device whose
	// node is bind-mounted into the Pod.
	Block Mode = "block"
)

// Volume is what the store records of a volume; the record is written after
// the data, so a volume without a record does not exist.
type Volume struct {
	ID            string `json:"id"`
	Mode          Mode   `json:"mode"`
	CapacityBytes int64  `json:"capacityBytes"`
	// SourceSnapshot or SourceVolume when the volume was made from one.
	SourceSnapshot string `json:"sourceSnapshot,omitempty"`
	SourceVolume   string `json:"sourceVolume,omitempty"`
}

// Snapshot is what the store records of a snapshot.
type Snapshot struct {
	ID             string    `json:"id"`
	SourceVolumeID string    `json:"sourceVolumeId"`
	Mode           Mode      `json:"mode"`
	SizeBytes      int64     `json:"sizeBytes"`
	CreatedAt      time.Time `json:"createdAt"`
}

// Store keeps volumes and snapshots under one directory:
//
//	volumes/ID.json    the record     volumes/ID/   data (filesystem)
//	snapshots/ID.json  the record     volumes/ID.img data (block)
//	groups/ID.json     a group of snapshots  snapshots/ID/ or snapshots/ID.img
//
// One mutex serialises changes: the test node makes few volumes, and
// serial changes make every CSI call idempotent without further thought.
type Store struct {
	root string
	mu   sync.Mutex
}

// validID accepts the names the sidecars generate (pvc-UUID, snapshot-UUID)
// and refuses anything that could leave the state directory.
var validID = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$`)

// OpenStore creates the store's directories under root.
func OpenStore(root string) (*Store, error) {
	for _, dir := range []string{"volumes", "snapshots", "groups"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			return nil, err
		}
	}
	return &Store{root: root}, nil
}

func checkID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("%q is not a valid volume or snapshot id", id)
	}
	return nil
}

// DataPath is where a volume's or snapshot's data lives.
func (s *Store) DataPath(kind, id string, mode Mode) string {
	p := filepath.Join(s.root, kind, id)
	if mode == Block {
		p += ".img"
	}
	return p
}

func (s *Store) recordPath(kind, id string) string {
	return filepath.Join(s.root, kind, id+".json")
}

// readRecord loads kind/id.json into v; found is false when there is none.
func (s *Store) readRecord(kind, id string, v any) (found bool, err error) {
	if err := checkID(id); err != nil {
		return false, err
	}
	data, err := os.ReadFile(s.recordPath(kind, id))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, json.Unmarshal(data, v)
}

// writeRecord writes the record atomically: the data is complete before it.
func (s *Store) writeRecord(kind, id string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := s.recordPath(kind, id) + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, s.recordPath(kind, id))
}

// GetVolume returns the volume's record, or nil when it does not exist.
func (s *Store) GetVolume(id string) (*Volume, error) {
	var v Volume
	found, err := s.readRecord("volumes", id, &v)
	if !found || err != nil {
		return nil, err
	}
	return &v, nil
}

// GetSnapshot returns the snapshot's record, or nil when it does not exist.
func (s *Store) GetSnapshot(id string) (*Snapshot, error) {
	var snap Snapshot
	found, err := s.readRecord("snapshots", id, &snap)
	if !found || err != nil {
		return nil, err
	}
	return &snap, nil
}

// ListSnapshots returns every snapshot record.
func (s *Store) ListSnapshots() ([]Snapshot, error) {
	paths, err := filepath.Glob(filepath.Join(s.root, "snapshots", "*.json"))
	if err != nil {
		return nil, err
	}
	var out []Snapshot
	for _, p := range paths {
		var snap Snapshot
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if err := json.Unmarshal(data, &snap); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		out = append(out, snap)
	}
	return out, nil
}

// CreateVolume makes the volume's data (empty, or a copy of the snapshot or
// volume it names) and then its record. An existing volume of the same
// shape is returned as it is, so a retried call succeeds.
func (s *Store) CreateVolume(want Volume) (*Volume, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if existing, err := s.GetVolume(want.ID); err != nil || existing != nil {
		if existing != nil && (existing.Mode != want.Mode || existing.CapacityBytes < want.CapacityBytes ||
			existing.SourceSnapshot != want.SourceSnapshot || existing.SourceVolume != want.SourceVolume) {
			return nil, errAlreadyExists
		}
		return existing, err
	}
	data := s.DataPath("volumes", want.ID, want.Mode)
	if err := os.RemoveAll(data); err != nil {
		return nil, err
	}
	var source string
	switch {
	case want.SourceSnapshot != "":
		snap, err := s.GetSnapshot(want.SourceSnapshot)
		if err != nil {
			return nil, err
		}
		if snap == nil {
			return nil, errSourceNotFound
		}
		if snap.Mode != want.Mode {
			return nil, fmt.Errorf("snapshot %s is of a %s volume, not %s", snap.ID, snap.Mode, want.Mode)
		}
		source = s.DataPath("snapshots", snap.ID, snap.Mode)
	case want.SourceVolume != "":
		vol, err := s.GetVolume(want.SourceVolume)
		if err != nil {
			return nil, err
		}
		if vol == nil {
			return nil, errSourceNotFound
		}
		if vol.Mode != want.Mode {
			return nil, fmt.Errorf("volume %s is %s, not %s", vol.ID, vol.Mode, want.Mode)
		}
		source = s.DataPath("volumes", vol.ID, vol.Mode)
	}
	if err := makeData(source, data, want.Mode, want.CapacityBytes); err != nil {
		return nil, err
	}
	if err := s.writeRecord("volumes", want.ID, want); err != nil {
		return nil, err
	}
	return &want, nil
}

// makeData fills dst: a copy of src when there is one, otherwise an empty
// directory or a sparse image of the given capacity. A block image copied
// from a smaller source grows to capacity.
func makeData(src, dst string, mode Mode, capacity int64) error {
	if src != "" {
		if err := copyTree(src, dst); err != nil {
			return err
		}
	} else if mode == Filesystem {
		if err := os.Mkdir(dst, 0o777); err != nil {
			return err
		}
		// Mkdir applies the umask; test workloads run as any user.
		return os.Chmod(dst, 0o777)
	}
	if mode == Block {
		f, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		info, err := f.Stat()
		if err != nil {
			return err
		}
		if info.Size() < capacity {
			return f.Truncate(capacity)
		}
	}
	return nil
}

// copyTree copies a directory tree or a file, keeping owners, modes, times,
// links and holes, through a temporary name so a failed copy leaves nothing.
func copyTree(src, dst string) error {
	tmp := dst + ".partial"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	out, err := exec.Command("cp", "-a", "--sparse=always", "--reflink=auto", src, tmp).CombinedOutput()
	if err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("copying %s: %v: %s", src, err, out)
	}
	return os.Rename(tmp, dst)
}

// DeleteVolume removes the record first, then the data, so a half-deleted
// volume no longer exists. Deleting a missing volume succeeds.
func (s *Store) DeleteVolume(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	vol, err := s.GetVolume(id)
	if err != nil || vol == nil {
		return err
	}
	if err := os.Remove(s.recordPath("volumes", id)); err != nil {
		return err
	}
	return os.RemoveAll(s.DataPath("volumes", id, vol.Mode))
}

// CreateSnapshot copies the volume's data and records the snapshot. A
// snapshot of the same name and source is returned as it is.
func (s *Store) CreateSnapshot(id, volumeID string) (*Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.createSnapshotLocked(id, volumeID)
}

func (s *Store) createSnapshotLocked(id, volumeID string) (*Snapshot, error) {
	if existing, err := s.GetSnapshot(id); err != nil || existing != nil {
		if existing != nil && existing.SourceVolumeID != volumeID {
			return nil, errAlreadyExists
		}
		return existing, err
	}
	vol, err := s.GetVolume(volumeID)
	if err != nil {
		return nil, err
	}
	if vol == nil {
		return nil, errSourceNotFound
	}
	data := s.DataPath("snapshots", id, vol.Mode)
	if err := os.RemoveAll(data); err != nil {
		return nil, err
	}
	if err := copyTree(s.DataPath("volumes", vol.ID, vol.Mode), data); err != nil {
		return nil, err
	}
	snap := Snapshot{ID: id, SourceVolumeID: volumeID, Mode: vol.Mode, SizeBytes: vol.CapacityBytes, CreatedAt: time.Now().UTC()}
	if err := s.writeRecord("snapshots", id, snap); err != nil {
		return nil, err
	}
	return &snap, nil
}

// DeleteSnapshot removes a snapshot; a missing one is already deleted.
func (s *Store) DeleteSnapshot(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deleteSnapshotLocked(id)
}

func (s *Store) deleteSnapshotLocked(id string) error {
	snap, err := s.GetSnapshot(id)
	if err != nil || snap == nil {
		return err
	}
	if err := os.Remove(s.recordPath("snapshots", id)); err != nil {
		return err
	}
	return os.RemoveAll(s.DataPath("snapshots", id, snap.Mode))
}

var (
	errAlreadyExists  = errors.New("exists with other parameters")
	errSourceNotFound = errors.New("source not found")
)
