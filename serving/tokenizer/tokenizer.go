// Package tokenizer is the mock engine's deterministic tokenizer: words and
// punctuation map to token ids by hash, so equal text gives equal tokens
// (and equal KV block hashes), and token ids map back to pronounceable
// made-up words. It is not a real model's vocabulary; it only has to be
// stable.
package tokenizer

import (
	"strings"
	"unicode"
)

// BOS starts every prompt, so an empty prompt still has one token.
const BOS uint32 = 1

// Tokenizer maps text to token ids below Vocab and back.
type Tokenizer struct {
	Vocab uint32
}

// New returns a tokenizer for a vocabulary of vocab ids (at least 256).
func New(vocab uint32) Tokenizer {
	return Tokenizer{Vocab: max(vocab, 256)}
}

// Encode splits text into words and punctuation marks and hashes each to an
// id in [2, Vocab). The prompt starts with BOS.
func (t Tokenizer) Encode(text string) []uint32 {
	out := []uint32{BOS}
	start := -1
	flush := func(end int) {
		if start >= 0 {
			out = append(out, t.id(text[start:end]))
			start = -1
		}
	}
	for i, r := range text {
		switch {
		case unicode.IsSpace(r):
			flush(i)
		case unicode.IsPunct(r) || unicode.IsSymbol(r):
			flush(i)
			out = append(out, t.id(string(r)))
		default:
			if start < 0 {
				start = i
			}
		}
	}
	flush(len(text))
	return out
}

func (t Tokenizer) id(word string) uint32 {
	h := uint32(2166136261)
	for i := 0; i < len(word); i++ {
		h ^= uint32(word[i])
		h *= 16777619
	}
	return 2 + h%(t.Vocab-2)
}

var syllables = [...]string{"ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "ga", "hi", "ju", "be", "fo"}

// Word is the text of one generated token: a made-up word, preceded by a
// space.
func (t Tokenizer) Word(id uint32) string {
	var b strings.Builder
	b.WriteByte(' ')
	n := id%3 + 1
	for range n {
		b.WriteString(syllables[id%uint32(len(syllables))])
		id /= uint32(len(syllables))
	}
	return b.String()
}

// Decode is the text of generated tokens.
func (t Tokenizer) Decode(ids []uint32) string {
	var b strings.Builder
	for _, id := range ids {
		b.WriteString(t.Word(id))
	}
	return b.String()
}
