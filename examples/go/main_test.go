package main

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	workv1 "worksidecar/gen/go/sidecar/work/v1"
)

func TestAddressBeforeOrAfterFlags(t *testing.T) {
	for _, args := range [][]string{
		{"unix:///tmp/s.sock", "-once", "-work-seconds", "0.5"},
		{"-once", "-work-seconds", "0.5", "unix:///tmp/s.sock"},
	} {
		opts, err := parseOptions(args)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		if opts.address != "unix:///tmp/s.sock" || !opts.once || opts.work != 500*time.Millisecond {
			t.Errorf("%v: got %+v", args, opts)
		}
		if opts.maxInFlight != 1 {
			t.Errorf("%v: -once without -max-in-flight takes one item at a time, got %d", args, opts.maxInFlight)
		}
	}
}

func TestAddressFromTheEnvironment(t *testing.T) {
	t.Setenv("WORK_SIDECAR_ADDR", "127.0.0.1:50051")
	t.Setenv("WORK_SIDECAR_ADDRESS", "127.0.0.1:1")
	opts, err := parseOptions([]string{"-max-in-flight", "3"})
	if err != nil {
		t.Fatal(err)
	}
	if opts.address != "127.0.0.1:50051" || opts.maxInFlight != 3 || opts.once {
		t.Errorf("WORK_SIDECAR_ADDR wins: got %+v", opts)
	}
}

func TestAddressFromTheAlias(t *testing.T) {
	t.Setenv("WORK_SIDECAR_ADDR", "")
	t.Setenv("WORK_SIDECAR_ADDRESS", "127.0.0.1:50052")
	opts, err := parseOptions(nil)
	if err != nil {
		t.Fatal(err)
	}
	if opts.address != "127.0.0.1:50052" {
		t.Errorf("WORK_SIDECAR_ADDRESS is an alias: got %+v", opts)
	}
}

func TestDefaults(t *testing.T) {
	t.Setenv("WORK_SIDECAR_ADDR", "")
	t.Setenv("WORK_SIDECAR_ADDRESS", "")
	opts, err := parseOptions(nil)
	if err != nil {
		t.Fatal(err)
	}
	if opts.address != "unix:///tmp/work-sidecar.sock" || opts.maxInFlight != 2 || opts.ping != 3*time.Second {
		t.Errorf("got %+v", opts)
	}
}

func TestExtraArgumentsAreRejected(t *testing.T) {
	if _, err := parseOptions([]string{"a:1", "b:2"}); err == nil {
		t.Error("two addresses were accepted")
	}
}

// TestFencingRule mirrors sidecar/_fencing.py: max(1.5 s, 10 % of the TTL), at most half the TTL.
func TestFencingRule(t *testing.T) {
	for ttl, want := range map[float64]time.Duration{
		2: time.Second, 4: 1500 * time.Millisecond, 15: 1500 * time.Millisecond, 60: 6 * time.Second,
	} {
		if got := fenceMargin(ttl); got != want {
			t.Errorf("fenceMargin(%v) = %v, want %v", ttl, got, want)
		}
	}
	expires := time.Unix(1000, 500_000_000)
	lease := &workv1.Lease{TtlSeconds: 60, ExpiresAt: timestamppb.New(expires)}
	if got := fenceAt(lease, time.Now()); !got.Equal(expires.Add(-6 * time.Second)) {
		t.Errorf("fenceAt = %v, want the margin before %v", got, expires)
	}
	now := time.Now()
	if got := fenceAt(&workv1.Lease{TtlSeconds: 60}, now); !got.Equal(now) {
		t.Errorf("an unknown expiry fences at once, got %v", got)
	}
}
