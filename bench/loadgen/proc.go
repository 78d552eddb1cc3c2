package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc: 100 on every Linux
// architecture Go supports.
const clockTicks = 100

// procTicks returns the user plus system CPU time of process pid, in clock ticks;
// with children, it adds the times of the children it has waited for.
func procTicks(pid int, children bool) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime, stime, cutime, cstime are fields 14 to 17.
	if len(f) < 15 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	var sum int64
	last := 12
	if children {
		last = 14
	}
	for _, s := range f[11 : last+1] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		sum += n
	}
	return sum, nil
}

// postgresTicks returns the CPU time, in clock ticks, of the PostgreSQL processes
// that work for database db: its backends and the cluster's own processes (the
// postmaster, WAL writer, checkpointer, ...), but not the backends of other
// databases, so that other work on a shared cluster is left out. A backend that
// exits between two readings takes its time with it, so readings are taken while
// the connections being measured are open.
func postgresTicks(db string) (int64, error) {
	dirs, err := filepath.Glob("/proc/[0-9]*")
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, dir := range dirs {
		comm, err := os.ReadFile(dir + "/comm")
		if err != nil || strings.TrimSpace(string(comm)) != "postgres" {
			continue
		}
		cmdline, err := os.ReadFile(dir + "/cmdline")
		if err != nil {
			continue
		}
		// A backend's title reads "postgres: 15/main: user db 127.0.0.1(port) state".
		title := string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
		isBackend := strings.Contains(title, "(") || strings.Contains(title, "[local]")
		if isBackend && !strings.Contains(title, " "+db+" ") {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(dir))
		t, err := procTicks(pid, false)
		if err != nil {
			continue // it exited meanwhile
		}
		sum += t
	}
	return sum, nil
}

// machineTicks returns the busy and total CPU time of the whole machine, from the
// first line of /proc/stat; idle, iowait and steal count as not busy.
func machineTicks() (busy, total int64, err error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, 0, fmt.Errorf("/proc/stat: empty")
	}
	fields := strings.Fields(sc.Text())
	if len(fields) < 6 || fields[0] != "cpu" {
		return 0, 0, fmt.Errorf("/proc/stat: unexpected first line")
	}
	for i, s := range fields[1:] {
		if i >= 8 { // guest times are already counted in user and nice
			break
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/stat: %w", err)
		}
		total += n
		if i != 3 && i != 4 && i != 7 { // idle, iowait, steal
			busy += n
		}
	}
	return busy, total, nil
}

// cpuSample is a reading of the CPU times that cpuSplit compares.
type cpuSample struct {
	at                     time.Time
	postgres, server, load int64
	machineBusy            int64
}

// cpuMeter reads the CPU time of PostgreSQL (for one database), of the process
// under test (the server, or pgbench) and of the load generator itself.
type cpuMeter struct {
	db        string
	serverPid int // 0: none
	loadPid   int // the load generator: this process, or pgbench
}

func (m cpuMeter) sample() (cpuSample, error) {
	s := cpuSample{at: time.Now()}
	var err error
	if m.db != "" { // "": only the machine and the load generator
		if s.postgres, err = postgresTicks(m.db); err != nil {
			return s, fmt.Errorf("postgres cpu: %w", err)
		}
	}
	if m.serverPid > 0 {
		if s.server, err = procTicks(m.serverPid, false); err != nil {
			return s, fmt.Errorf("server cpu: %w", err)
		}
	}
	if s.load, err = procTicks(m.loadPid, false); err != nil {
		return s, fmt.Errorf("load generator cpu: %w", err)
	}
	if s.machineBusy, _, err = machineTicks(); err != nil {
		return s, err
	}
	return s, nil
}

// cpuSplit is where the CPU went between two samples, in cores busy on average
// (CPU seconds per second of wall time).
type cpuSplit struct {
	Seconds  float64 `json:"seconds"`  // wall time between the samples
	Postgres float64 `json:"postgres"` // the bench database's backends and the cluster's processes
	Server   float64 `json:"server"`   // the messenger process (0 for pgbench runs)
	Load     float64 `json:"load"`     // the load generator, or pgbench
	Machine  float64 `json:"machine"`  // every process on the machine
	Cores    int     `json:"cores"`
}

// other is what the rest of the machine used: work that is not the benchmark's.
func (s cpuSplit) other() float64 { return max(s.Machine-s.Postgres-s.Server-s.Load, 0) }

func split(a, b cpuSample) cpuSplit {
	wall := b.at.Sub(a.at).Seconds()
	cores := func(t int64) float64 { return float64(t) / clockTicks / wall }
	return cpuSplit{
		Seconds:  wall,
		Postgres: cores(b.postgres - a.postgres),
		Server:   cores(b.server - a.server),
		Load:     cores(b.load - a.load),
		Machine:  cores(b.machineBusy - a.machineBusy),
		Cores:    runtime.NumCPU(),
	}
}

// residentKB returns VmRSS of process pid, in KiB.
func residentKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// waitQuiet waits, at most maxWait, until the machine is less than maxBusy cores
// busy over one second, so that other work on a shared machine disturbs the
// measurements less; it returns the last second's reading either way.
func waitQuiet(maxBusy float64, maxWait time.Duration) (cpuSplit, error) {
	deadline := time.Now().Add(maxWait)
	for {
		a, err := cpuMeter{loadPid: os.Getpid()}.sample()
		if err != nil {
			return cpuSplit{}, err
		}
		time.Sleep(time.Second)
		b, err := cpuMeter{loadPid: os.Getpid()}.sample()
		if err != nil {
			return cpuSplit{}, err
		}
		s := split(a, b)
		if s.Machine < maxBusy || time.Now().After(deadline) {
			if s.Machine >= maxBusy {
				logf("the machine is still %.2f cores busy with other work after %v: measuring anyway", s.Machine, maxWait)
			}
			return s, nil
		}
	}
}
