package pprofserve

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestSecondsBounded(t *testing.T) {
	h := Handler()
	post := httptest.NewRequest("POST", "/debug/pprof/trace", strings.NewReader("seconds=3600"))
	post.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, post)
	if rec.Code != http.StatusBadRequest {
		t.Errorf("POST seconds=3600: %d, want 400", rec.Code)
	}
	for _, tc := range []struct {
		url  string
		code int
	}{
		{"/debug/pprof/profile?seconds=3600", http.StatusBadRequest},
		{"/debug/pprof/trace?seconds=61", http.StatusBadRequest},
		{"/debug/pprof/trace?seconds=NaN", http.StatusBadRequest},
		{"/debug/pprof/trace?seconds=-1", http.StatusBadRequest},
		{"/debug/pprof/heap", http.StatusOK},
		{"/debug/pprof/goroutine?debug=1", http.StatusOK},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", tc.url, nil))
		if rec.Code != tc.code {
			t.Errorf("GET %s: %d, want %d (%s)", tc.url, rec.Code, tc.code, rec.Body.String())
		}
	}
}
