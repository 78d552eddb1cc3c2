package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// pgbenchResult is one pgbench run; report reads it from pgbench-NAME.json.
type pgbenchResult struct {
	Name      string   `json:"name"`
	Script    string   `json:"script"`
	Clients   int      `json:"clients"`
	Seconds   int      `json:"seconds"`
	TPS       float64  `json:"tps"`
	LatencyMs float64  `json:"latencyMs"` // average
	MinTPS    float64  `json:"minTPS"`    // the slowest second
	MaxTPS    float64  `json:"maxTPS"`    // the fastest second
	Failed    int      `json:"failed"`
	CPU       cpuSplit `json:"cpu"`
	// With -rate: the schedule, and the latency of each transaction from its
	// scheduled start (pgbench's schedule lag included, as the load generator's
	// open loops count a send's wait for a free worker), from pgbench's
	// per-transaction log; from loadgen bare, from each transaction's release (see
	// schedule).
	Rate  float64 `json:"rate,omitempty"`
	P50Ms float64 `json:"p50Ms,omitempty"`
	P99Ms float64 `json:"p99Ms,omitempty"`
}

// per1000 returns what cores busy on average through the run come to, in CPU
// seconds per 1,000 transactions (0 if none committed).
func (r *pgbenchResult) per1000(cores float64) float64 {
	if r.TPS <= 0 {
		return 0
	}
	return cores / r.TPS * 1000
}

var (
	tpsLine     = regexp.MustCompile(`(?m)^tps = ([0-9.]+) \(without initial connection time\)`)
	latencyLine = regexp.MustCompile(`(?m)^latency average = ([0-9.]+) ms`)
	failedLine  = regexp.MustCompile(`(?m)^number of failed transactions: ([0-9]+)`)
	progress    = regexp.MustCompile(`(?m)^progress: [0-9.]+ s, ([0-9.]+) tps`)
)

// runPgbench runs pgbench on a script with prepared statements (the server
// prepares its send statement too), and samples the CPU time of PostgreSQL and of
// pgbench from its second second to its second last, while its connections are
// open. pgbench's whole output, with its tps second by second, goes to a log file
// beside the result.
func runPgbench(ctx context.Context, args []string) error {
	fs := newFlags("pgbench")
	name := fs.String("name", "", "name of the run, for the report")
	script := fs.String("script", "bench/send.sql", "pgbench script")
	clients := fs.Int("clients", 16, "concurrent clients")
	threads := fs.Int("threads", 2, "pgbench threads")
	seconds := fs.Int("seconds", 10, "length of the run")
	define := fs.String("define", "", "a variable for the script, name=value")
	rate := fs.Float64("rate", 0, "transactions a second, in all (pgbench -R), with latency percentiles; 0: as fast as it goes")
	url := fs.String("url", "", "the database, as a URL")
	db := fs.String("db", "messenger_bench", "the database's name, for PostgreSQL's CPU time")
	out := fs.String("out", "", "where to write the result")
	quiet := addQuietFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" || *url == "" || *out == "" {
		return fmt.Errorf("pgbench: -name, -url and -out are required")
	}
	if *seconds < 3 {
		return fmt.Errorf("pgbench: -seconds %d: want at least 3", *seconds)
	}
	cmdArgs := []string{"-n", "-M", "prepared", "-P", "1", "-c", strconv.Itoa(*clients), "-j", strconv.Itoa(*threads),
		"-T", strconv.Itoa(*seconds), "-f", *script}
	if *define != "" {
		cmdArgs = append(cmdArgs, "-D", *define)
	}
	var txLog string // with -rate: pgbench's per-transaction logs, in a directory of their own
	if *rate > 0 {
		dir, err := os.MkdirTemp("", "loadgen-pgbench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		txLog = filepath.Join(dir, "tx")
		cmdArgs = append(cmdArgs, "-R", strconv.FormatFloat(*rate, 'f', 1, 64), "-l", "--log-prefix", txLog)
	}
	cmdArgs = append(cmdArgs, *url)
	if _, err := quiet.wait(); err != nil {
		return err
	}
	var output bytes.Buffer
	cmd := exec.CommandContext(ctx, "pgbench", cmdArgs...)
	cmd.Stdout = &output
	cmd.Stderr = &output
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("pgbench: %w", err)
	}
	meter := cpuMeter{db: *db, loadPid: cmd.Process.Pid}
	start := time.Now()
	var a, b cpuSample
	var sampleErr error
	time.Sleep(time.Second)
	if a, sampleErr = meter.sample(); sampleErr == nil {
		time.Sleep(time.Until(start.Add(time.Duration(*seconds-1) * time.Second)))
		b, sampleErr = meter.sample()
	}
	err := cmd.Wait()
	logPath := strings.TrimSuffix(*out, ".json") + ".log"
	if werr := os.WriteFile(logPath, output.Bytes(), 0o644); werr != nil {
		return werr
	}
	if err != nil {
		os.Stderr.Write(output.Bytes())
		return fmt.Errorf("pgbench %s: %w", *name, err)
	}
	if sampleErr != nil {
		return fmt.Errorf("pgbench %s: %w", *name, sampleErr)
	}
	res := pgbenchResult{Name: *name, Script: *script, Clients: *clients, Seconds: *seconds, CPU: split(a, b)}
	m := tpsLine.FindSubmatch(output.Bytes())
	if m == nil {
		return fmt.Errorf("pgbench %s: no tps in its output", *name)
	}
	res.TPS, _ = strconv.ParseFloat(string(m[1]), 64)
	if m := latencyLine.FindSubmatch(output.Bytes()); m != nil {
		res.LatencyMs, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	if m := failedLine.FindSubmatch(output.Bytes()); m != nil {
		res.Failed, _ = strconv.Atoi(string(m[1]))
	}
	if *rate > 0 {
		res.Rate = *rate
		if res.P50Ms, res.P99Ms, err = txLatencies(txLog); err != nil {
			return fmt.Errorf("pgbench %s: %w", *name, err)
		}
		logf("pgbench %s at %.0f tx/s: latency p50 %.2f ms, p99 %.2f ms (from each transaction's scheduled start)",
			*name, *rate, res.P50Ms, res.P99Ms)
	}
	for i, m := range progress.FindAllSubmatch(output.Bytes(), -1) {
		tps, _ := strconv.ParseFloat(string(m[1]), 64)
		if i == 0 || tps < res.MinTPS {
			res.MinTPS = tps
		}
		res.MaxTPS = max(res.MaxTPS, tps)
	}
	logf("pgbench %s: %.0f tx/s (seconds from %.0f to %.0f), avg latency %.1f ms, %d failed; output in %s",
		*name, res.TPS, res.MinTPS, res.MaxTPS, res.LatencyMs, res.Failed, logPath)
	return writeJSON(*out, res)
}

// txLatencies reads pgbench's per-transaction logs (prefix.PID, and prefix.PID.N
// for its other threads) and returns the p50 and p99 of the committed
// transactions' latencies in ms. Under -R a line is "client_id transaction_no
// time script_no time_epoch time_us schedule_lag", time counted from the
// transaction's scheduled start: a transaction that waited for a free client
// counts its wait, as a send of the load generator's open loops that waits for a
// free worker does. A failed transaction has a word in place of its time
// ("failed", "serialization", "deadlock"): pgbench counts those, and they are
// left out here.
func txLatencies(prefix string) (p50, p99 float64, err error) {
	files, err := filepath.Glob(prefix + ".*")
	if err != nil || len(files) == 0 {
		return 0, 0, fmt.Errorf("no per-transaction log %s.*", prefix)
	}
	var took []time.Duration
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return 0, 0, err
		}
		for _, line := range strings.Split(string(b), "\n") {
			fields := strings.Fields(line)
			if len(fields) == 0 {
				continue
			}
			if len(fields) < 7 {
				return 0, 0, fmt.Errorf("%s: %q: want 7 fields (a log of a run with -R)", f, line)
			}
			us, err := strconv.ParseInt(fields[2], 10, 64)
			if err != nil {
				continue // a failed transaction
			}
			took = append(took, time.Duration(us)*time.Microsecond)
		}
	}
	if len(took) == 0 {
		return 0, 0, fmt.Errorf("no committed transaction in %s.*", prefix)
	}
	return ms(percentile(took, 50)), ms(percentile(took, 99)), nil
}
