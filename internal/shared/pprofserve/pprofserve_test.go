package pprofserve

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestSecondsBounded(t *testing.T) {
	h := Handler()
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
