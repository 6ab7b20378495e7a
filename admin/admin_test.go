package admin

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// Each path answers GET; a wrong method on a real path is 405 with Allow,
// an unknown path 404.
func TestMethodsAndPaths(t *testing.T) {
	h := New(nil).Handler()
	for _, tc := range []struct {
		method, path string
		status       int
	}{
		{"GET", "/healthz", 200},
		{"HEAD", "/healthz", 200},
		{"GET", "/metrics", 200},
		{"POST", "/healthz", 405},
		{"DELETE", "/metrics", 405},
		{"GET", "/nothing", 404},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
		if rec.Code != tc.status {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, rec.Code, tc.status)
		}
		if tc.status == http.StatusMethodNotAllowed && rec.Header().Get("Allow") == "" {
			t.Errorf("%s %s: 405 without Allow", tc.method, tc.path)
		}
	}
}
