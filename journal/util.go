package journal

import (
	"cmp"
	"slices"
)

func sortActors(a []ActorInfo) {
	slices.SortFunc(a, func(x, y ActorInfo) int {
		return cmp.Or(cmp.Compare(x.Kind, y.Kind), cmp.Compare(x.ID, y.ID))
	})
}
