// The snapshotter conformance suite of containerd, pointed at `csi-thin snapshotter`.
//
// For each case the suite makes a fresh root directory; we write a pool config there (the template in
// $CSI_THIN_SUITE_POOL with @ROOT@ replaced: the pool, its image file and its LMDB all live under the
// root; and @ID@ by the digits that make the root unique: a pool name of its own), start
// `$CSI_THIN_SUITE_CMD snapshotter --pool-config <root>/pool.yaml --socket <root>/s.sock` and hand the suite containerd's proxy client on that socket: the client containerd itself uses for a
// [proxy_plugins] snapshotter. The case's cleanup stops the process, destroys the pool, and fails when
// a mount under the root is left.
//
// Run by tests/root/test_ctrd_suite.py, which sets the environment and checks the machine afterwards.
package suite

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// the name the suite is told: "csi-thin" takes the suite's default branches (renames of lower-layer
// directories must work: they do on a block device's filesystem)
const name = "csi-thin"

func TestSnapshotterSuite(t *testing.T) {
	var command []string
	if err := json.Unmarshal([]byte(os.Getenv("CSI_THIN_SUITE_CMD")), &command); err != nil || len(command) == 0 {
		t.Fatalf("CSI_THIN_SUITE_CMD must be the JSON argv that runs csi-thin (e.g. [\"python3\", \"-m\", \"csi_thin.cli\"]): %v", err)
	}
	template := os.Getenv("CSI_THIN_SUITE_POOL")
	if !strings.Contains(template, "@ROOT@") {
		t.Fatal("CSI_THIN_SUITE_POOL must be a pool config whose paths are under @ROOT@")
	}
	testsuite.SnapshotterSuite(t, name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return start(ctx, command, template, root)
	})
}

func start(ctx context.Context, command []string, template, root string) (snapshots.Snapshotter, func() error, error) {
	config := filepath.Join(root, "pool.yaml")
	// the suite's root is <TMPDIR>/snapshot-suite-csi-thin-<digits>/root
	parent := filepath.Base(filepath.Dir(root))
	id := parent[strings.LastIndex(parent, "-")+1:]
	body := strings.NewReplacer("@ROOT@", root, "@ID@", id).Replace(template)
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		return nil, nil, err
	}
	socket := filepath.Join(root, "s.sock")
	logPath := filepath.Join(root, "snapshotter.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close() // the child holds its own copy
	cmd := exec.Command(command[0], append(command[1:], "snapshotter", "--pool-config", config, "--socket", socket)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()

	var conn *grpc.ClientConn
	cleanup := func() error {
		var errs []error
		if conn != nil {
			errs = append(errs, conn.Close())
		}
		errs = append(errs, p.stop())
		// the pool's image mount, loop device and files: what a node's operator would run
		destroy := exec.Command(command[0], append(command[1:], "pool", "destroy", "--config", config, "--yes")...)
		if out, err := destroy.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("pool destroy: %v: %s", err, out))
		}
		if left := mountsUnder(filepath.Dir(root)); len(left) > 0 {
			errs = append(errs, fmt.Errorf("mounts left under %s: %v", filepath.Dir(root), left))
		}
		err := errors.Join(errs...)
		// the snapshotter's log, shown with the case's output when it fails (go test -v: always)
		if out, readErr := os.ReadFile(logPath); readErr == nil {
			log.G(ctx).Infof("csi-thin snapshotter log:\n%s", out)
		}
		return err
	}

	conn, err = grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err == nil {
		err = waitServing(ctx, snapshotsapi.NewSnapshotsClient(conn), p)
	}
	if err != nil {
		return nil, nil, errors.Join(err, cleanup())
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name), cleanup, nil
}

// startBound bounds a snapshotter's start-up: it assembles its pool (loop devices, mkfs, mount); the
// first start in a fresh VM under emulation also reads all of Python's modules over 9p, which was
// seen to take over a minute on a loaded machine.
const startBound = 5 * time.Minute

// waitServing returns once the service answers (a Stat of a key nobody made: NotFound), or fails when
// the process exits first or startBound passes.
func waitServing(ctx context.Context, client snapshotsapi.SnapshotsClient, p *process) error {
	ctx, cancel := context.WithTimeout(ctx, startBound)
	defer cancel()
	go func() {
		select {
		case <-p.done: // no use waiting for a socket nobody will serve
			cancel()
		case <-ctx.Done():
		}
	}()
	// WaitForReady: the call waits for the socket to accept instead of failing at once
	_, err := client.Stat(ctx, &snapshotsapi.StatSnapshotRequest{Snapshotter: name, Key: "csi-thin-suite-probe"},
		grpc.WaitForReady(true))
	switch {
	case err == nil:
		return errors.New("a Stat of a key nobody made succeeded")
	case status.Code(err) == codes.NotFound:
		return nil
	case p.exited():
		return fmt.Errorf("csi-thin snapshotter exited before serving: %v", p.err)
	case ctx.Err() != nil:
		return fmt.Errorf("csi-thin snapshotter not serving in %v: %v", startBound, err)
	default:
		return fmt.Errorf("probe Stat: %v", err)
	}
}

// process is the running snapshotter: done is closed when it has exited, err is then its exit.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the snapshotter with SIGTERM (its clean exit), SIGKILL after 30 s.
func (p *process) stop() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return errors.New("csi-thin snapshotter did not stop in 30 s of SIGTERM: killed")
	}
	var exit *exec.ExitError
	if errors.As(p.err, &exit) && exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		return fmt.Errorf("csi-thin snapshotter exited: %v", p.err)
	}
	return nil
}

// mountsUnder lists the mount points below dir (/proc/self/mountinfo, field 5).
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return []string{err.Error()}
	}
	defer f.Close()
	var found []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			found = append(found, fields[4])
		}
	}
	return found
}
