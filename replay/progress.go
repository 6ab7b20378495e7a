package replay

import (
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// Progress is told how far a long replay got. Replayer calls Begin, any
// number of Adds, then End, from one goroutine.
type Progress interface {
	// Begin starts a replay of total events (negative: unknown).
	Begin(what string, total int64)
	// Add reports n more events replayed.
	Add(n int64)
	// End ends the replay and removes any bar from the screen.
	End()
}

type noProgress struct{}

func (noProgress) Begin(string, int64) {}
func (noProgress) Add(int64)           {}
func (noProgress) End()                {}

// TerminalProgress returns a progress bar on w when w is a terminal, and
// nil otherwise (pipes, files, tests), so output that is read by programs
// never carries one.
func TerminalProgress(w io.Writer) Progress {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return NewBar(f)
}

// Bar draws a progress bar on a writer, but only for replays that take
// longer than Delay: quick ones leave the screen alone.
type Bar struct {
	w io.Writer
	// Delay before the bar appears; default 500 ms.
	Delay time.Duration

	mu    sync.Mutex
	what  string
	total int64
	count int64
	bar   *progressbar.ProgressBar
	done  chan struct{}
}

// NewBar returns a bar drawing on w, whatever w is.
func NewBar(w io.Writer) *Bar { return &Bar{w: w, Delay: 500 * time.Millisecond} }

// Begin implements Progress.
func (b *Bar) Begin(what string, total int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.what, b.total, b.count = what, total, 0
	done := make(chan struct{})
	b.done = done
	if b.Delay <= 0 {
		b.showLocked()
		return
	}
	go func() {
		t := time.NewTimer(b.Delay)
		defer t.Stop()
		select {
		case <-t.C:
			b.mu.Lock()
			defer b.mu.Unlock()
			if b.done == done { // not ended yet
				b.showLocked()
			}
		case <-done:
		}
	}()
}

func (b *Bar) showLocked() {
	opts := []progressbar.Option{
		progressbar.OptionSetWriter(b.w),
		progressbar.OptionSetDescription(b.what),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100 * time.Millisecond),
		progressbar.OptionClearOnFinish(),
	}
	total := b.total
	if total < 0 {
		// Unknown length: a spinner with the elapsed time.
		total = -1
	} else {
		opts = append(opts, progressbar.OptionSetItsString("events"), progressbar.OptionShowCount(), progressbar.OptionShowIts())
	}
	b.bar = progressbar.NewOptions64(total, opts...)
	_ = b.bar.Set64(b.count)
}

// Add implements Progress.
func (b *Bar) Add(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.count += n
	if b.bar != nil {
		_ = b.bar.Add64(n)
	}
}

// End implements Progress.
func (b *Bar) End() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done != nil {
		close(b.done)
		b.done = nil
	}
	if b.bar != nil {
		_ = b.bar.Finish()
		_ = b.bar.Clear()
		b.bar = nil
	}
}
