"""The registrar's web status page at ``/``: one HTML document, no framework, no fetch
from anywhere but ``/pool`` of the same registrar, which it reads every few seconds."""

from __future__ import annotations

from twisted.web import resource

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>xenpool</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;background:#f4f5f7;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} .sub{color:#666;margin-bottom:1em}
#summary span{display:inline-block;margin-right:1.5em;font-weight:600}
#hosts{display:flex;flex-wrap:wrap;gap:12px;margin:1em 0}
.host{background:#fff;border-radius:8px;padding:10px 12px;width:260px;box-shadow:0 1px 3px #0002;border-top:5px solid #2a9d4b}
.host.draining,.host.maintenance{border-top-color:#e0a000}.host.fenced,.host.unreachable{border-top-color:#c0392b}
.host h2{font-size:1.05em;margin:0;display:flex;justify-content:space-between}
.state{font-size:.8em;font-weight:600;text-transform:uppercase}
.bar{height:8px;background:#e6e6e6;border-radius:4px;margin:2px 0 6px}.bar div{height:100%;border-radius:4px;background:#3b7dd8}
.small{font-size:.8em;color:#555}.vm{display:inline-block;background:#eef3fb;border-radius:4px;padding:1px 6px;margin:2px;font-size:.85em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 3px #0002;margin-bottom:1em}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;font-size:.9em}
.ev-fence_success,.ev-fence_failure,.ev-host_lost{color:#c0392b}.ev-failover{color:#1d6fb8;font-weight:600}
</style></head><body>
<h1>xenpool pool</h1><div class="sub" id="sub">loading ...</div>
<div id="summary"></div>
<div id="hosts"></div>
<h3>VMs</h3><table id="vms"><thead><tr><th>VM</th><th>host</th><th>state</th><th>uptime</th><th>failovers</th><th>last failover</th></tr></thead><tbody></tbody></table>
<h3>Recent events</h3><table id="events"><thead><tr><th>time</th><th>event</th><th>what</th><th>from</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
function el(tag, attrs, text){const e=document.createElement(tag);for(const k in attrs||{})e.setAttribute(k,attrs[k]);if(text!==undefined)e.textContent=text;return e}
function pct(x){return x==null?"-":Math.round(x*100)+"%"}
function dur(s){if(s==null)return"";s=Math.round(s);if(s<120)return s+" s";if(s<7200)return Math.round(s/60)+" min";return Math.round(s/3600)+" h"}
function clock(t){return new Date(t*1000).toLocaleTimeString()}
function chart(samples, now){
  const ns="http://www.w3.org/2000/svg",w=236,h=40,svg=document.createElementNS(ns,"svg");
  svg.setAttribute("width",w);svg.setAttribute("height",h);svg.setAttribute("class","chart");
  const bg=document.createElementNS(ns,"rect");bg.setAttribute("width",w);bg.setAttribute("height",h);bg.setAttribute("fill","#f7f9fc");svg.appendChild(bg);
  if(samples&&samples.length){
    const pts=samples.map(([t,l])=>[(w*(1-(now-t)/3600)).toFixed(1),(h-1-l*(h-2)).toFixed(1)]);
    if(pts.length===1)pts.unshift([0,pts[0][1]]);
    const line=document.createElementNS(ns,"polyline");line.setAttribute("points",pts.map(p=>p.join(",")).join(" "));
    line.setAttribute("fill","none");line.setAttribute("stroke","#3b7dd8");line.setAttribute("stroke-width","1.5");svg.appendChild(line);
  }
  return svg;
}
function describe(e){
  const k=e.kind;
  if(k.startsWith("fence"))return (e.host||"")+(e.server_id?" for "+e.server_id:"")+(e.reason?": "+e.reason:"");
  if(k==="failover")return e.server_id+": "+(e.from_host||e.from_pe)+" \u2192 "+(e.to_host||e.to_pe)+(e.took_s!=null?" in "+e.took_s.toFixed(2)+" s":"");
  if(k==="moved")return e.server_id+": "+(e.from_host||e.from_pe)+" \u2192 "+(e.to_host||e.to_pe);
  if(k==="host_lost"||k==="host_back")return (e.host||e.pe)+(e.reason?" ("+e.reason+")":"");
  if(k==="maintenance")return e.host+": "+e.state;
  if(k==="vm_lost")return e.server_id+" on "+(e.host||e.pe);
  return (e.server_id||"")+" "+(e.reason||"");
}
function render(p){
  document.getElementById("sub").textContent="registrar "+p.registrar+" \u00b7 updated "+clock(p.time);
  const up=p.hosts.filter(h=>h.state==="up").length, running=p.vms.filter(v=>v.state==="running").length;
  const sum=document.getElementById("summary");sum.replaceChildren(el("span",{},up+"/"+p.hosts.length+" hosts up"),el("span",{},running+"/"+p.vms.length+" VMs running"),el("span",{},p.events.filter(e=>e.kind==="failover").length+" failovers"));
  const hosts=document.getElementById("hosts");hosts.replaceChildren();
  for(const h of p.hosts){
    const c=el("div",{class:"host "+h.state,"data-host":h.name});
    const t=el("h2");t.append(el("span",{},h.name),el("span",{class:"state"},h.state));c.append(t);
    c.append(el("div",{class:"small"},(h.pe||"")+(h.cpus?" \u00b7 "+h.cpus+" CPUs":"")));
    c.append(el("div",{class:"small"},"load "+pct(h.load)));
    const lb=el("div",{class:"bar"}),lf=el("div");lf.style.width=pct(h.load==null?0:Math.min(1,h.load));lb.append(lf);c.append(lb);
    if(h.ram_kb){const used=1-h.free_ram_kb/h.ram_kb;c.append(el("div",{class:"small"},"RAM "+Math.round((h.ram_kb-h.free_ram_kb)/1024)+" of "+Math.round(h.ram_kb/1024)+" MB used"));
      const rb=el("div",{class:"bar"}),rf=el("div");rf.style.width=pct(Math.max(0,Math.min(1,used)));rf.style.background="#8e5ad8";rb.append(rf);c.append(rb);}
    c.append(chart((p.history||{})[h.name]||(p.history||{})[h.pe],p.time));
    const vms=el("div");for(const v of h.vms||[])vms.append(el("span",{class:"vm"},v));c.append(vms);
    hosts.append(c);
  }
  const vb=document.querySelector("#vms tbody");vb.replaceChildren();
  for(const v of p.vms){const r=el("tr",{"data-vm":v.name});const lf=v.last_failover;
    r.append(el("td",{},v.name),el("td",{},v.host||"-"),el("td",{},v.state),el("td",{},dur(v.uptime_s)),el("td",{},String(v.failovers||0)),
      el("td",{},lf?(lf.from+" \u2192 "+lf.to+(lf.took_s!=null?" ("+lf.took_s.toFixed(2)+" s)":"")+" at "+clock(lf.time)):""));vb.append(r);}
  const eb=document.querySelector("#events tbody");eb.replaceChildren();
  for(const e of p.events.slice().reverse().slice(0,40)){const r=el("tr",{class:"ev-"+e.kind});
    r.append(el("td",{},clock(e.time)),el("td",{},e.kind.replace("_"," ")),el("td",{},describe(e)),el("td",{class:"small"},e.source||""));eb.append(r);}
}
async function refresh(){
  try{const r=await fetch("pool",{cache:"no-store"});if(!r.ok)throw new Error(r.status);render(await r.json())}
  catch(err){document.getElementById("sub").textContent="cannot read /pool: "+err}
}
refresh();setInterval(refresh,3000);
</script></body></html>
"""


class Page(resource.Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return PAGE.encode()
