package main

import (
	"embed"
	"io/fs"
	"net/http"
	"path"
	"strings"
)

//go:embed web
var webFiles embed.FS

// webRoot is the web client's files, served at /.
var webRoot, _ = fs.Sub(webFiles, "web")

var webServer = http.FileServerFS(webRoot)

// serveWeb serves the web client: a file that exists as itself, any other path as
// index.html, so the client's own routes survive a reload.
func serveWeb(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(path.Clean(r.URL.Path), "/")
	if name == "" || name == "index.html" {
		serveIndex(w, r)
		return
	}
	if f, err := webRoot.Open(name); err == nil {
		st, err := f.Stat()
		f.Close()
		if err == nil && !st.IsDir() {
			w.Header().Set("Cache-Control", "no-cache")
			webServer.ServeHTTP(w, r)
			return
		}
	}
	serveIndex(w, r)
}

//go:embed docs/openapi.yaml
var openAPIDocument []byte

// handleOpenAPI serves GET /api/openapi.yaml: the API's contract, docs/openapi.yaml.
func handleOpenAPI() apiHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "application/yaml; charset=utf-8")
		w.Write(openAPIDocument)
		return nil
	}
}

func serveIndex(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-cache")
	http.ServeFileFS(w, r, webRoot, "index.html")
}
