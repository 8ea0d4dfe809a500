import json,sys,collections,statistics
med=collections.defaultdict(lambda: collections.defaultdict(list))
mn=collections.defaultdict(lambda: collections.defaultdict(list))
for f in sys.argv[1:]:
    for l in open(f):
        l=l.strip()
        if not l.startswith('{'): continue
        r=json.loads(l)
        if r.get('op')!='ns5': continue
        impl=r['impl']
        if impl=='numpy': impl='Haswell' if r['blas_kernel']=='Haswell' else 'SkylakeX'
        med[(r['shape'],r['threads'])][impl].append(r['ms_median'])
        mn[(r['shape'],r['threads'])][impl].append(r['ms_min'])
def fl(shape):
    d=[int(x) for x in shape.split('x')]
    b,m,n=(1,*d) if len(d)==2 else d
    a,c=min(m,n),max(m,n)
    return b*5*(4*a*a*c+2*a**3)
order=["128x128","256x1024","512x512","1024x1024","1024x4096","2048x2048","64x128x352"]
print("| shape | threads | numpy SkylakeX ms | numpy Haswell ms | muon-faer ms | muon-faer GFLOP/s | vs best numpy | best-of-runs: numpy / muon-faer ms | best-of-runs ratio | generic ms | own vs generic | runs |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for t in (1,2):
    for s in order:
        v=med.get((s,t)); w=mn.get((s,t))
        if not v: continue
        sk,hw,mf=(statistics.median(v[k]) for k in ('SkylakeX','Haswell','muon-faer'))
        bsk,bhw,bmf=(min(w[k]) for k in ('SkylakeX','Haswell','muon-faer'))
        best=min(sk,hw); bbest=min(bsk,bhw)
        g=v.get('muon-faer-generic')
        gen=f"{statistics.median(g):.2f}" if g else "-"
        gain=f"{statistics.median(g)/mf:.2f}x" if g else "-"
        print(f"| {s} | {t} | {sk:.2f} | {hw:.2f} | {mf:.2f} | {fl(s)/mf/1e6:.0f} | {best/mf:.2f}x | {bbest:.2f} / {bmf:.2f} | {bbest/bmf:.2f}x | {gen} | {gain} | {len(v['muon-faer'])} |")
