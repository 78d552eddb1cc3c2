package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
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
