package tokenizer

import "testing"

func TestEncodeStable(t *testing.T) {
	tk := New(32000)
	a := tk.Encode("Hello, world! Hello")
	b := tk.Encode("Hello ,  world!Hello")
	if len(a) != 6 || a[0] != BOS {
		t.Fatalf("tokens %v", a)
	}
	for i := range a {
		if a[i] != b[i] || a[i] >= 32000 {
			t.Fatalf("%v vs %v", a, b)
		}
	}
	if a[1] != a[5] {
		t.Fatal("same word, different ids")
	}
	if got := tk.Encode(""); len(got) != 1 {
		t.Fatalf("empty prompt %v", got)
	}
	if tk.Decode([]uint32{5, 5}) != tk.Word(5)+tk.Word(5) || tk.Word(5) == tk.Word(6) {
		t.Fatal("decode")
	}
}
