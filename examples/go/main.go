// Command sandbox is an example work-sidecar sandbox in Go, using only the stubs that protoc-gen-go and
// protoc-gen-go-grpc generate from proto/sidecar/work/v1/work_service.proto (build.sh generates them; they
// are not committed). It does what every sandbox does:
//
//	WatchWork(max_in_flight) -> on WorkAssigned: KeepAlive pings {work_id, lease_token} every few seconds,
//	"work" (GetWork + UpdateWorkMetadata to show the API), then StopWork(force=true).
//	StopRequested finishes an item early; LeaseLost abandons it at once (no StopWork: it is not ours any more);
//	Draining means no new work will come.
//	The sidecar may restart under running items (a crash, a container update): while it cannot be reached
//	(UNAVAILABLE), the watch, the KeepAlive stream and StopWork reconnect with backoff, and the new watch
//	resumes the items still held (WatchWorkRequest.resume): a sidecar restarted with its --state-dir carries on.
//	Fencing: while the sidecar cannot be reached nobody may be renewing the lease, so an item is given up a
//	fencing margin before its lease's last known expiry (from WorkAssigned, then each KeepAlive answer): it is
//	then abandoned like on LeaseLost (no StopWork), unless a KeepAlive answer came back before.
//
// Usage:
//
//	sandbox unix:///tmp/work-sidecar.sock [-once] [-max-in-flight 2] [-work-seconds 2]
//	WORK_SIDECAR_ADDR=127.0.0.1:50051 sandbox        (WORK_SIDECAR_ADDRESS is accepted as an alias)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	workv1 "worksidecar/gen/go/sidecar/work/v1"
)

type options struct {
	address     string
	once        bool
	maxInFlight uint
	sandboxID   string
	work        time.Duration
	ping        time.Duration
}

func say(format string, args ...interface{}) {
	fmt.Printf("[sandbox] "+format+"\n", args...)
}

func clock(ts *timestamppb.Timestamp) string {
	if ts == nil || ts.GetSeconds() == 0 {
		return "-"
	}
	return ts.AsTime().UTC().Format("15:04:05")
}

// dial connects to "unix:///path" (a Unix socket) or "host:port". The dialer is explicit so that it works
// with every grpc-go version, also those without a built-in unix resolver.
func dial(address string) (*grpc.ClientConn, error) {
	// A local sidecar that restarts is back within seconds: look for it at least every second, not at gRPC's
	// default reconnect backoff (1 s growing to 120 s), which after a long outage finds it only when the item's
	// fence is near or past.
	reconnect := grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
		MinConnectTimeout: 5 * time.Second,
	})
	if strings.HasPrefix(address, "unix:") {
		path := strings.TrimPrefix(strings.TrimPrefix(address, "unix:"), "//")
		dialer := func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		return grpc.Dial("passthrough:///unix", grpc.WithInsecure(), grpc.WithContextDialer(dialer), reconnect)
	}
	return grpc.Dial(address, grpc.WithInsecure(), reconnect)
}

// reconnectFor is how long an unreachable (restarting) sidecar is retried before giving up.
const reconnectFor = 60 * time.Second

// The fencing rule of sidecar/_fencing.py (keep the constants in step): the margin is max(1.5 s, 10 % of the
// TTL), never more than half the TTL; an item is given up that margin before its lease's last known expiry.
const (
	fenceMarginMin   = 1.5
	fenceMarginRatio = 0.1
)

// fenceMargin is how long before a lease's expiry an item whose lease may not be renewed is given up.
func fenceMargin(ttlSeconds float64) time.Duration {
	margin := math.Min(math.Max(fenceMarginMin, ttlSeconds*fenceMarginRatio), ttlSeconds/2)
	return time.Duration(margin * float64(time.Second))
}

// fenceAt is when to give up an item whose last known lease status is lease: now if its expiry is not known.
func fenceAt(lease *workv1.Lease, now time.Time) time.Time {
	if lease.GetExpiresAt() == nil || (lease.GetExpiresAt().GetSeconds() == 0 && lease.GetExpiresAt().GetNanos() == 0) {
		return now
	}
	return lease.GetExpiresAt().AsTime().Add(-fenceMargin(float64(lease.GetTtlSeconds())))
}

// unreachable says whether err is UNAVAILABLE from the transport (the sidecar is down or restarting), not an
// answer of the sidecar's (those carry status details: a Work API outage, a drain).
func unreachable(err error) bool {
	return status.Code(err) == codes.Unavailable && len(status.Convert(err).Proto().GetDetails()) == 0
}

// backoff is the wait before reconnect attempt n (1, 2, ...): 0.1 s doubling to 2 s, with jitter.
func backoff(n int) time.Duration {
	ceiling := 100 * time.Millisecond << uint(n-1)
	if n > 5 || ceiling > 2*time.Second {
		ceiling = 2 * time.Second
	}
	return ceiling/2 + time.Duration(rand.Int63n(int64(ceiling/2)+1))
}

// item is one assigned work item: finish ends the work early (StopRequested, LeaseLost, the fence); fenced ends
// when the item is given up because the sidecar could not be reached before its lease would expire (the unary
// calls for it run under it, so they give up then too).
type item struct {
	workID     string
	token      string
	finish     context.CancelFunc
	mu         sync.Mutex
	lost       bool
	finished   context.Context
	fenced     context.Context
	fence      context.CancelFunc
	lease      *workv1.Lease // the latest status: from WorkAssigned, then from each KeepAlive answer
	fenceTimer *time.Timer
	fenceArms  int // which arming fenceTimer is, so that a timer firing as it is disarmed does not fence
	retired    bool
}

func newItem(assigned *workv1.WorkAssigned) *item {
	finished, finish := context.WithCancel(context.Background())
	fenced, fence := context.WithCancel(context.Background())
	return &item{
		workID: assigned.GetWork().GetId(), token: assigned.GetLeaseToken(), finish: finish, finished: finished,
		fenced: fenced, fence: fence, lease: assigned.GetLease(),
	}
}

func (it *item) markLost() {
	it.mu.Lock()
	it.lost = true
	it.mu.Unlock()
	it.finish()
}

// heard records a KeepAlive answer: the latest lease status, and the sidecar is reachable (disarms the fence).
func (it *item) heard(lease *workv1.Lease) {
	it.mu.Lock()
	defer it.mu.Unlock()
	it.lease = lease
	it.disarmLocked()
}

// armFence starts the fence's timer while the sidecar cannot be reached (nobody may be renewing the lease): at
// the fencing point, unless a KeepAlive answer disarms it before, the item is lost and abandoned (no StopWork).
func (it *item) armFence() {
	it.mu.Lock()
	defer it.mu.Unlock()
	if it.fenceTimer != nil || it.lost || it.retired {
		return
	}
	it.fenceArms++
	arm := it.fenceArms
	it.fenceTimer = time.AfterFunc(time.Until(fenceAt(it.lease, time.Now())), func() { it.fenceNow(arm) })
}

// retire disarms the fence for good: the item is done with (stopped or abandoned).
func (it *item) retire() {
	it.mu.Lock()
	defer it.mu.Unlock()
	it.retired = true
	it.disarmLocked()
}

func (it *item) disarmLocked() {
	if it.fenceTimer != nil {
		it.fenceTimer.Stop()
		it.fenceTimer = nil
	}
}

func (it *item) fenceNow(arm int) {
	it.mu.Lock()
	if it.fenceTimer == nil || it.fenceArms != arm || it.lost { // disarmed meanwhile, or lost already
		it.mu.Unlock()
		return
	}
	it.fenceTimer = nil
	it.lost = true
	it.mu.Unlock()
	say("fenced %s: the sidecar could not be reached before the lease would expire", it.workID)
	it.fence()
	it.finish()
}

func (it *item) isFenced() bool {
	return it.fenced.Err() != nil
}

func (it *item) isLost() bool {
	it.mu.Lock()
	defer it.mu.Unlock()
	return it.lost
}

// workOn keeps an item's lease alive, works on it, and stops it (unless its lease was lost).
func workOn(client workv1.WorkServiceClient, assigned *workv1.WorkAssigned, it *item, opts options) {
	work := assigned.GetWork()
	token := assigned.GetLeaseToken()
	say("assigned %s (session %s), lease token of %d chars, lease %s ttl %ds",
		work.GetId(), work.GetData().GetId(), len(token), assigned.GetLease().GetState(), assigned.GetLease().GetTtlSeconds())
	if assigned.GetSessionCredentials().GetSessionsToken() != "" {
		say("  got the session credential for this item (not printed: it is a secret)")
	}

	// KeepAlive: one bidi stream for this lease; each ping is answered with the lease status, and changes
	// are pushed at once (LEASE_STATE_STOP_REQUESTED, LEASE_STATE_LOST). If the sidecar restarts, a new
	// stream with the same token re-attaches the lease.
	kaCtx, kaCancel := context.WithCancel(context.Background())
	defer kaCancel()
	go keepAlive(kaCtx, client, work.GetId(), token, it, opts)

	// The "work": read the item, tag it, wait (or until a stop request or a lost lease ends it early). The calls
	// run under it.fenced: once the item is fenced, they give up.
	ctx, cancel := context.WithTimeout(it.fenced, reconnectFor)
	current, err := retry(ctx, it.armFence, func() (*workv1.GetWorkResponse, error) {
		return client.GetWork(ctx, &workv1.GetWorkRequest{WorkId: work.GetId(), LeaseToken: token})
	})
	if err == nil {
		say("  GetWork %s: %s, lease %s", work.GetId(), current.GetWork().GetState(), current.GetLease().GetState())
		var updated *workv1.UpdateWorkMetadataResponse
		updated, err = retry(ctx, it.armFence, func() (*workv1.UpdateWorkMetadataResponse, error) {
			return client.UpdateWorkMetadata(ctx, &workv1.UpdateWorkMetadataRequest{
				WorkId:     work.GetId(),
				LeaseToken: token,
				Set:        map[string]string{"handled_by": opts.sandboxID, "language": "go"},
			})
		})
		if err == nil {
			say("  UpdateWorkMetadata %s: metadata %v", work.GetId(), updated.GetWork().GetMetadata())
		}
	}
	cancel()
	if err != nil {
		if !it.isFenced() {
			say("  work on %s failed: %v", work.GetId(), err)
		}
	} else {
		select {
		case <-time.After(opts.work):
		case <-it.finished.Done():
		}
	}
	kaCancel()

	defer it.retire()
	if it.isLost() {
		say("abandoned %s: the lease is lost, not stopping it (it is not ours any more)", work.GetId())
		return
	}
	// Retried while the sidecar cannot be reached, but only until the fence: then the item is not ours to stop.
	ctx, cancel = context.WithTimeout(it.fenced, reconnectFor)
	defer cancel()
	stopped, err := retry(ctx, it.armFence, func() (*workv1.StopWorkResponse, error) {
		return client.StopWork(ctx, &workv1.StopWorkRequest{WorkId: work.GetId(), LeaseToken: token, Force: true})
	})
	if err != nil {
		if it.isLost() {
			say("abandoned %s: the lease is lost, not stopping it (it is not ours any more)", work.GetId())
			return
		}
		say("stop %s failed: %v", work.GetId(), err)
		return
	}
	say("stopped %s: state %s", work.GetId(), stopped.GetWork().GetState())
}

// retry runs a unary call again, with backoff, while the sidecar cannot be reached (until ctx ends);
// onUnreachable is told of each unreachable try (it arms the item's fence).
func retry[T any](ctx context.Context, onUnreachable func(), call func() (T, error)) (T, error) {
	for attempt := 1; ; attempt++ {
		response, err := call()
		if err == nil || !unreachable(err) {
			return response, err
		}
		onUnreachable()
		select {
		case <-ctx.Done():
			return response, err
		case <-time.After(backoff(attempt)):
		}
	}
}

// keepAlive pings the lease until ctx ends, re-opening the stream while the sidecar cannot be reached.
func keepAlive(ctx context.Context, client workv1.WorkServiceClient, workID, token string, it *item, opts options) {
	failures := 0
	for ctx.Err() == nil {
		err := keepAliveStream(ctx, client, workID, token, it, opts, func() { failures = 0 })
		if ctx.Err() != nil || err == nil {
			return
		}
		if !unreachable(err) {
			if status.Code(err) != codes.Canceled && !errors.Is(err, io.EOF) {
				say("  keepalive %s failed: %v", workID, err)
			}
			return
		}
		it.armFence() // nobody may be renewing the lease until a KeepAlive answer comes again
		failures++
		say("  keepalive %s: the sidecar cannot be reached, reconnecting", workID)
		select {
		case <-ctx.Done():
		case <-time.After(backoff(failures)):
		}
	}
}

// keepAliveStream is one KeepAlive stream: it returns the error that ended it.
func keepAliveStream(ctx context.Context, client workv1.WorkServiceClient, workID, token string, it *item,
	opts options, answered func()) error {
	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.KeepAlive(streamCtx)
	if err != nil {
		return err
	}
	go func() {
		ticker := time.NewTicker(opts.ping)
		defer ticker.Stop()
		for {
			if err := stream.Send(&workv1.KeepAliveRequest{WorkId: workID, LeaseToken: token}); err != nil {
				return
			}
			select {
			case <-streamCtx.Done():
				return
			case <-ticker.C:
			}
		}
	}()
	for {
		response, err := stream.Recv()
		if err != nil {
			return err
		}
		answered()
		lease := response.GetLease()
		it.heard(lease)
		say("  keepalive %s: %s ttl=%ds expires=%s",
			lease.GetWorkId(), lease.GetState(), lease.GetTtlSeconds(), clock(lease.GetExpiresAt()))
		switch lease.GetState() {
		case workv1.LeaseState_LEASE_STATE_LOST:
			it.markLost()
			return nil
		case workv1.LeaseState_LEASE_STATE_STOP_REQUESTED:
			it.finish()
		}
	}
}

// run watches until the watch ends, the sidecar drains, or (with once) the first item is done.
func run(opts options) error {
	conn, err := dial(opts.address)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := workv1.NewWorkServiceClient(conn)

	watchCtx, cancelWatch := context.WithCancel(context.Background())
	defer cancelWatch()
	say("watching %s as %s (max_in_flight=%d)", opts.address, opts.sandboxID, opts.maxInFlight)

	var (
		mu      sync.Mutex
		items   = map[string]*item{}
		running sync.WaitGroup
		handled int
		leaving bool
	)
	// openWatch opens a watch; after a reconnect, `resume` re-attaches the items still held to it.
	openWatch := func() (workv1.WorkService_WatchWorkClient, error) {
		request := &workv1.WatchWorkRequest{MaxInFlight: uint32(opts.maxInFlight), SandboxId: opts.sandboxID}
		mu.Lock()
		for workID, it := range items {
			request.Resume = append(request.Resume, &workv1.HeldLease{WorkId: workID, LeaseToken: it.token})
		}
		mu.Unlock()
		return client.WatchWork(watchCtx, request)
	}
	watch, err := openWatch()
	if err != nil {
		return err
	}
	failures := 0
	var unreachableSince time.Time
	// On Draining, keep the watch open until the last item is stopped: the open stream keeps this sandbox's
	// leases alive and carries StopRequested / LeaseLost for them.
	leave := func() {
		mu.Lock()
		already := leaving
		leaving = true
		mu.Unlock()
		if !already {
			go func() {
				running.Wait()
				cancelWatch()
			}()
		}
	}
	lookup := func(workID string) *item {
		mu.Lock()
		defer mu.Unlock()
		return items[workID]
	}

	for {
		event, err := watch.Recv()
		if err != nil {
			mu.Lock()
			left := leaving
			mu.Unlock()
			if unreachable(err) && !left {
				if unreachableSince.IsZero() {
					unreachableSince = time.Now()
				}
				if time.Since(unreachableSince) < reconnectFor {
					failures++
					say("the sidecar cannot be reached: reconnecting the watch")
					time.Sleep(backoff(failures))
					if watch, err = openWatch(); err == nil {
						continue
					}
				}
			}
			running.Wait()
			mu.Lock()
			left = leaving
			count := handled
			mu.Unlock()
			if errors.Is(err, io.EOF) || (left && status.Code(err) == codes.Canceled) {
				say("done: %d item(s)", count)
				return nil
			}
			return err
		}
		failures, unreachableSince = 0, time.Time{}
		switch ev := event.GetEvent().(type) {
		case *workv1.WatchWorkResponse_WorkAssigned:
			assigned := ev.WorkAssigned
			it := newItem(assigned)
			workID := it.workID
			mu.Lock()
			items[workID] = it
			mu.Unlock()
			running.Add(1)
			go func() {
				defer running.Done()
				workOn(client, assigned, it, opts)
				it.finish()
				it.fence() // releases the context; the item is done
				mu.Lock()
				delete(items, workID)
				handled++
				mu.Unlock()
			}()
			if opts.once {
				// Close the watch now, not after the item: a watch still open when the item is stopped has
				// a free slot again, and the sidecar would hand it a second item just before we leave. The
				// lease lives on the KeepAlive pings alone from here (they also bring STOP_REQUESTED, LOST).
				mu.Lock()
				leaving = true
				mu.Unlock()
				cancelWatch()
			}
		case *workv1.WatchWorkResponse_StopRequested:
			workID := ev.StopRequested.GetWorkId()
			say("stop requested for %s", workID)
			if it := lookup(workID); it != nil {
				it.finish()
			}
		case *workv1.WatchWorkResponse_LeaseLost:
			lost := ev.LeaseLost
			say("lease lost for %s: %s (%s)", lost.GetWorkId(), lost.GetReason(), lost.GetMessage())
			if it := lookup(lost.GetWorkId()); it != nil {
				it.markLost()
			}
		case *workv1.WatchWorkResponse_Draining:
			say("the sidecar is draining (deadline %s): no new work will come", clock(ev.Draining.GetDeadline()))
			leave()
		default:
			say("unknown event %T", ev)
		}
	}
}

func parseOptions(args []string) (options, error) {
	flags := flag.NewFlagSet("sandbox", flag.ContinueOnError)
	once := flags.Bool("once", false, "exit after one item")
	maxInFlight := flags.Uint("max-in-flight", 0, "items worked on at once (default 1 with -once, else 2)")
	sandboxID := flags.String("sandbox-id", "example-go", "the name the sidecar shows for this sandbox")
	work := flags.Float64("work-seconds", 2, "how long the \"work\" on one item takes")
	ping := flags.Float64("ping-seconds", 3, "seconds between KeepAlive pings")
	// The address may come before or after the flags.
	if err := flags.Parse(args); err != nil {
		return options{}, err
	}
	address := ""
	if flags.NArg() > 0 {
		address = flags.Arg(0)
		if err := flags.Parse(flags.Args()[1:]); err != nil {
			return options{}, err
		}
		if flags.NArg() > 0 {
			return options{}, fmt.Errorf("unexpected arguments: %v", flags.Args())
		}
	}
	if address == "" {
		address = os.Getenv("WORK_SIDECAR_ADDR")
	}
	if address == "" {
		address = os.Getenv("WORK_SIDECAR_ADDRESS") // the alias
	}
	if address == "" {
		address = "unix:///tmp/work-sidecar.sock"
	}
	if *maxInFlight == 0 {
		*maxInFlight = 2
		if *once {
			*maxInFlight = 1
		}
	}
	return options{
		address:     address,
		once:        *once,
		maxInFlight: *maxInFlight,
		sandboxID:   *sandboxID,
		work:        time.Duration(*work * float64(time.Second)),
		ping:        time.Duration(*ping * float64(time.Second)),
	}, nil
}

func main() {
	opts, err := parseOptions(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		sig := <-signals
		os.Exit(128 + int(sig.(syscall.Signal)))
	}()
	if err := run(opts); err != nil {
		say("watch failed: %v", err)
		os.Exit(1)
	}
}
