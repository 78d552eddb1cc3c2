// Command streamflood opens many event streams as one user, as a hostile client
// would, and counts how the server answers each (docs/limits.md, "Streams"):
//
//	streamflood -url http://127.0.0.1:3000 -n 3000
//
// It signs in with the development login (the server needs DEV_LOGIN=true), holds
// every stream it gets open until all have been tried, then prints the count of
// each answer and whether a second user can still open a stream.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"
)

func main() {
	base := flag.String("url", "http://127.0.0.1:3000", "the server")
	n := flag.Int("n", 3000, "streams to open")
	flag.Parse()
	if err := run(*base, *n); err != nil {
		fmt.Fprintf(os.Stderr, "streamflood: %v\n", err)
		os.Exit(1)
	}
}

func run(base string, n int) error {
	suffix := fmt.Sprint(time.Now().UnixNano() % 1e9)
	token, err := login(base, "flood_"+suffix)
	if err != nil {
		return err
	}
	// One connection per stream, and a bound on each answer's wait: a server out of
	// descriptors accepts no more connections, and they would hang.
	hc := &http.Client{Transport: &http.Transport{
		MaxIdleConnsPerHost: -1, DisableKeepAlives: true, ResponseHeaderTimeout: 2 * time.Second,
		DialContext: (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
	}}
	var mu sync.Mutex // guards counts and open
	counts := map[string]int{}
	var open []*http.Response
	defer func() {
		for _, r := range open {
			r.Body.Close()
		}
	}()
	start := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 100)
	for range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			resp, err := openStream(hc, base, token)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				counts["no answer (timeout or refused)"]++
				return
			}
			counts[fmt.Sprintf("status %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))]++
			if resp.StatusCode == http.StatusOK {
				open = append(open, resp)
			} else {
				resp.Body.Close()
			}
		})
	}
	wg.Wait()
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Printf("%d stream requests from one user in %v:\n", n, time.Since(start).Round(time.Millisecond))
	for _, k := range keys {
		fmt.Printf("  %s: %d\n", k, counts[k])
	}
	other, err := login(base, "other_"+suffix)
	if err != nil {
		return fmt.Errorf("second user: %w", err)
	}
	resp, err := openStream(hc, base, other)
	if err != nil {
		fmt.Printf("another user's stream: %v\n", err)
		return nil
	}
	resp.Body.Close()
	fmt.Printf("another user's stream: status %d\n", resp.StatusCode)
	return nil
}

func login(base, username string) (string, error) {
	body, _ := json.Marshal(map[string]string{"username": username})
	resp, err := http.Post(base+"/api/login", "application/json", bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var res struct{ Token string }
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil || res.Token == "" {
		return "", fmt.Errorf("login %s: status %d", username, resp.StatusCode)
	}
	return res.Token, nil
}

func openStream(hc *http.Client, base, token string) (*http.Response, error) {
	req, _ := http.NewRequest("GET", base+"/api/messages", nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+token)
	return hc.Do(req)
}
